package cli

// regionctl rollout: the controller that drives the staged-rollout state
// machine (regionctl/rollout) against the fleet. The machine decides; this
// file only does what its actions ask (dry runs, measurements, applies,
// bakes, gates, rollbacks) and feeds back what it observed, storing the
// record in the root KMS after every transition (fenced by revision and
// epoch), so that a controller that dies is resumed from the record
// (rollout resume) without skipping a stage.

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/lifecycle"
	"github.com/cairnkms/cairn/internal/safety"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/regionctl/rollout"
)

// rolloutBodyFormat is how the controller encodes a rollout.Record in the
// root KMS's RolloutRecord.body: the record's JSON.
const rolloutBodyFormat = "cairn.rollout.v1+json"

// rolloutStore keeps the durable rollout records. The root KMS implements
// it (PutRollout, GetRollout, ListRollouts); its contract is theirs:
//
//   - Put creates a record (expectedRevision 0; codes.AlreadyExists if the
//     id exists; codes.FailedPrecondition while another rollout is in
//     flight for one of its regions) or replaces the record whose revision
//     is expectedRevision and whose epoch is at most rec's
//     (codes.Aborted otherwise: someone else wrote; read it again). It
//     returns the record as stored, with its new revision.
//   - Get returns one record (codes.NotFound if none).
//   - List returns the records sorted by id, only those in flight if asked.
type rolloutStore interface {
	Put(ctx context.Context, rec *statev1.RolloutRecord, expectedRevision uint64) (*statev1.RolloutRecord, error)
	Get(ctx context.Context, id string) (*statev1.RolloutRecord, error)
	List(ctx context.Context, inFlightOnly bool) ([]*statev1.RolloutRecord, error)
}

// rootRollouts is the root KMS's rolloutStore.
type rootRollouts struct{ r *root }

func (s rootRollouts) Put(ctx context.Context, rec *statev1.RolloutRecord, expectedRevision uint64) (*statev1.RolloutRecord, error) {
	return rootCall(ctx, s.r, func(ctx context.Context, c rootkmsv1.RootKMSClient) (*statev1.RolloutRecord, error) {
		return c.PutRollout(ctx, &rootkmsv1.PutRolloutRequest{Rollout: rec, ExpectedRevision: expectedRevision})
	})
}

func (s rootRollouts) Get(ctx context.Context, id string) (*statev1.RolloutRecord, error) {
	return rootCall(ctx, s.r, func(ctx context.Context, c rootkmsv1.RootKMSClient) (*statev1.RolloutRecord, error) {
		return c.GetRollout(ctx, &rootkmsv1.GetRolloutRequest{Id: id})
	})
}

func (s rootRollouts) List(ctx context.Context, inFlightOnly bool) ([]*statev1.RolloutRecord, error) {
	resp, err := rootCall(ctx, s.r, func(ctx context.Context, c rootkmsv1.RootKMSClient) (*rootkmsv1.ListRolloutsResponse, error) {
		return c.ListRollouts(ctx, &rootkmsv1.ListRolloutsRequest{InFlightOnly: inFlightOnly})
	})
	return resp.GetRollouts(), err
}

// rolloutStoreKey carries a rolloutStore that replaces the root KMS's (tests).
type rolloutStoreKey struct{}

// rolloutsOf is the rollout store of r: the root KMS's, unless ctx carries
// another (tests).
func rolloutsOf(ctx context.Context, r *root) rolloutStore {
	if s, ok := ctx.Value(rolloutStoreKey{}).(rolloutStore); ok {
		return s
	}
	return rootRollouts{r}
}

// checkRegionsFree refuses (rollout.CheckConflict, a *rollout.ConflictError)
// a change to the regions of plan while a rollout in flight in store holds
// one of them: rollout start, rotate --due's rollout and bundle push all ask
// it, so that no change reaches a region under another rollout's feet (its
// bake, gates and rollback judge and restore what it applied). A stored
// record whose body this regionctl cannot read is judged by the regions and
// in-flight flag the root KMS keeps beside it.
func checkRegionsFree(ctx context.Context, store rolloutStore, plan rollout.Plan) error {
	existing, err := store.List(ctx, true)
	if err != nil {
		return fmt.Errorf("listing the rollouts in flight: %w", err)
	}
	var inFlight []rollout.Record
	for _, p := range existing {
		rec, err := decodeRollout(p)
		if err != nil {
			rec = rollout.Record{ID: p.GetId(), Plan: rollout.Plan{Regions: p.GetRegions()}, Phase: rollout.PhasePending}
		}
		inFlight = append(inFlight, rec)
	}
	return rollout.CheckConflict(inFlight, plan)
}

// sleepKey carries RunOptions.Sleep in a command's context.
type sleepKey struct{}

// sleepFor waits d (bounded by ctx) on regionctl's clock.
func sleepFor(ctx context.Context, d time.Duration) error {
	if f, ok := ctx.Value(sleepKey{}).(func(context.Context, time.Duration) error); ok {
		return f(ctx, d)
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// encodeRollout is rec as the root KMS stores it.
func encodeRollout(rec rollout.Record) (*statev1.RolloutRecord, error) {
	body, err := json.Marshal(rec)
	if err != nil {
		return nil, fmt.Errorf("encoding rollout %s: %w", rec.ID, err)
	}
	return &statev1.RolloutRecord{Id: rec.ID, Regions: slices.Sorted(slices.Values(rec.Plan.Regions)), InFlight: rec.InFlight(),
		Epoch: rec.Epoch, Owner: rec.Owner, StartedBy: rec.Plan.Change.By, Reason: rec.Plan.Change.Why,
		BodyFormat: rolloutBodyFormat, Body: body}, nil
}

// decodeRollout is the rollout.Record a stored record holds.
func decodeRollout(p *statev1.RolloutRecord) (rollout.Record, error) {
	var rec rollout.Record
	if f := p.GetBodyFormat(); f != rolloutBodyFormat {
		return rec, fmt.Errorf("rollout %s: body format %q, this regionctl reads %q", p.GetId(), f, rolloutBodyFormat)
	}
	if err := json.Unmarshal(p.GetBody(), &rec); err != nil {
		return rec, fmt.Errorf("rollout %s: decoding its body: %w", p.GetId(), err)
	}
	if rec.ID != p.GetId() || rec.Epoch != p.GetEpoch() {
		return rec, fmt.Errorf("rollout %s: the body (id %s, epoch %d) disagrees with the record (epoch %d)", p.GetId(), rec.ID, rec.Epoch, p.GetEpoch())
	}
	if err := rollout.Check(rec); err != nil {
		return rec, fmt.Errorf("rollout %s: the stored record is inconsistent: %w", p.GetId(), err)
	}
	return rec, nil
}

// errFenced: another controller took the rollout over.
var errFenced = errors.New("fenced off")

// controller runs one rollout.
type controller struct {
	o              *options
	src            *identity.Source
	r              *root
	store          rolloutStore
	stdout, stderr io.Writer

	rec      rollout.Record
	revision uint64 // of rec in the store; 0: not stored yet
	// rollbackAsked: this run is an operator's rollback, so ending rolled
	// back is its success.
	rollbackAsked bool

	// bundles are the change's signed bundles, by region.
	bundles map[string]*bundlev1.SignedBundle
	// lastGood are the signed bundles the servers served before the change,
	// by SHA-256 (hex): what a rollback restores.
	lastGood map[string]*bundlev1.SignedBundle
	// base are the stage servers' request stats at the stage's baseline.
	base map[string]*kmsv1.RequestStats
	// rollbackFailed are the servers whose rollback failed in this run: they
	// are not retried until the next run (rollout resume).
	rollbackFailed map[string]bool
}

func newController(ctx context.Context, o *options, stdout, stderr io.Writer) (*controller, error) {
	src, err := o.source()
	if err != nil {
		return nil, err
	}
	r, err := o.root()
	if err != nil {
		return nil, err
	}
	return &controller{o: o, src: src, r: r, store: rolloutsOf(ctx, r), stdout: stdout, stderr: stderr,
		bundles: map[string]*bundlev1.SignedBundle{}, lastGood: map[string]*bundlev1.SignedBundle{},
		base: map[string]*kmsv1.RequestStats{}, rollbackFailed: map[string]bool{}}, nil
}

func (c *controller) Close() { c.r.Close() }

// owner names this controller: its SPIFFE ID and process.
func (c *controller) owner() string {
	host, _ := os.Hostname()
	return fmt.Sprintf("%s %s/%d", c.src.ID(), host, os.Getpid())
}

// load reads rollout id from the store.
func (c *controller) load(ctx context.Context, id string) error {
	p, err := c.store.Get(ctx, id)
	if err != nil {
		return fmt.Errorf("reading rollout %s: %w", id, err)
	}
	rec, err := decodeRollout(p)
	if err != nil {
		return err
	}
	c.rec, c.revision = rec, p.GetRevision()
	return nil
}

// save stores next in place of c.rec (fenced by c.revision) and makes it
// current.
func (c *controller) save(ctx context.Context, next rollout.Record) error {
	p, err := encodeRollout(next)
	if err != nil {
		return err
	}
	stored, err := c.store.Put(ctx, p, c.revision)
	if err != nil {
		return err
	}
	c.rec, c.revision = next, stored.GetRevision()
	return nil
}

// feed applies ev to the record and stores the result. If someone else
// wrote the record since it was read (an operator's pause or abort), it
// reads it again and applies ev to that; if another controller took over,
// it returns errFenced. Reports and publishes are printed here; the work
// the record asks for next is re-derived from it (rollout.Actions).
func (c *controller) feed(ctx context.Context, ev rollout.Event) error {
	now := clockNow(ctx)
	next, acts, err := rollout.Next(c.rec, ev, now)
	if err != nil {
		return err
	}
	if err := c.save(ctx, next); err != nil {
		if status.Code(err) != codes.Aborted {
			return fmt.Errorf("storing rollout %s: %w", c.rec.ID, err)
		}
		epoch := c.rec.Epoch
		if err := c.load(ctx, c.rec.ID); err != nil {
			return err
		}
		if c.rec.Epoch != epoch {
			return fmt.Errorf("%w: rollout %s was taken over by %s at epoch %d", errFenced, c.rec.ID, c.rec.Owner, c.rec.Epoch)
		}
		next, acts, err = rollout.Next(c.rec, ev, now)
		if errors.Is(err, rollout.ErrUnexpectedEvent) {
			fmt.Fprintf(c.stdout, "the record changed meanwhile (%s); dropped: %v\n", c.phase(), err)
			return nil
		}
		if err != nil {
			return err
		}
		if err := c.save(ctx, next); err != nil {
			return fmt.Errorf("storing rollout %s: %w", c.rec.ID, err)
		}
	}
	for _, a := range acts {
		switch a := a.(type) {
		case rollout.ReportAction:
			fmt.Fprintf(c.stdout, "%s  %s\n", now.UTC().Format(time.RFC3339), a.Text)
		case rollout.PublishAction:
			fmt.Fprintf(c.stdout, "%s  publish: %s (the rollout reached and passed every server of their regions)\n", now.UTC().Format(time.RFC3339), strings.Join(a.Keysets, ", "))
		}
	}
	return nil
}

func (c *controller) phase() string {
	p := string(c.rec.Phase)
	if c.rec.Paused {
		p += " (paused)"
	}
	return p
}

// run does the record's outstanding work until there is none (completed,
// halted, paused) and reports how it ended.
func (c *controller) run(ctx context.Context) error {
	for {
		acts := slices.DeleteFunc(rollout.Actions(c.rec), func(a rollout.Action) bool {
			ra, ok := a.(rollout.RollbackAction)
			return ok && !slices.ContainsFunc(ra.Servers, func(s string) bool { return !c.rollbackFailed[s] })
		})
		if len(acts) == 0 {
			break
		}
		rev := c.revision
		err := c.do(ctx, acts[0])
		switch {
		case errors.Is(err, errFenced):
			fmt.Fprintf(c.stderr, "%v; this controller stops\n", err)
			return errReported
		case err != nil:
			fmt.Fprintf(c.stderr, "rollout %s stopped at %s: %v\nnothing more is done; the record keeps its state: regionctl rollout resume %s\n", c.rec.ID, c.phase(), err, c.rec.ID)
			return errReported
		case c.revision == rev:
			fmt.Fprintf(c.stderr, "rollout %s: %s changed nothing; stopping (regionctl rollout resume %s to retry)\n", c.rec.ID, acts[0], c.rec.ID)
			return errReported
		}
	}
	fmt.Fprintln(c.stdout, rollout.Status(c.rec))
	switch {
	case c.rec.Phase == rollout.PhaseCompleted:
		return nil
	case c.rec.Paused:
		fmt.Fprintf(c.stdout, "paused: regionctl rollout resume %s to go on\n", c.rec.ID)
		return nil
	case c.rec.Phase == rollout.PhaseRollingBack:
		fmt.Fprintf(c.stderr, "rollout %s: a rollback failed; fix it and run regionctl rollout resume %s to retry\n", c.rec.ID, c.rec.ID)
		return errReported
	case c.rec.Phase == rollout.PhaseRolledBack && c.rollbackAsked:
		return nil // the operator's rollback is done: success
	}
	fmt.Fprintf(c.stderr, "rollout %s ended %s: %s\n", c.rec.ID, c.rec.Phase, c.rec.Halt)
	return errReported
}

// do performs one action and feeds back what it observed.
func (c *controller) do(ctx context.Context, a rollout.Action) error {
	switch a := a.(type) {
	case rollout.DryRunAction:
		return c.dryRun(ctx, a)
	case rollout.MeasureAction:
		m, stats := c.measure(ctx, a.Servers, false)
		maps.Copy(c.base, stats)
		return c.feed(ctx, rollout.Measured{Epoch: c.rec.Epoch, Stage: a.Stage, Metrics: m})
	case rollout.ApplyAction:
		return c.apply(ctx, a)
	case rollout.WaitAction:
		for now := clockNow(ctx); now.Before(a.Until); now = clockNow(ctx) {
			if err := sleepFor(ctx, a.Until.Sub(now)); err != nil {
				return err
			}
		}
		return c.feed(ctx, rollout.Tick{Epoch: c.rec.Epoch})
	case rollout.ProbeAction:
		return c.gate(ctx, a)
	case rollout.RollbackAction:
		return c.rollback(ctx, a)
	}
	return fmt.Errorf("unknown action %s", a)
}

// byRegion groups servers of the plan by region.
func (c *controller) byRegion(servers []string) map[string][]string {
	out := map[string][]string{}
	for _, s := range servers {
		region := c.rec.Servers[s].Region
		out[region] = append(out[region], s)
	}
	return out
}

func refOf(r *bundlev1.BundleRef) rollout.BundleRef {
	if r == nil {
		return rollout.BundleRef{}
	}
	return rollout.BundleRef{Region: r.GetRegion(), Serial: r.GetSerial(), SHA256: hex.EncodeToString(r.GetSha256())}
}

func sumOf(sb *bundlev1.SignedBundle) string {
	h := sha256.Sum256(sb.GetBundle())
	return hex.EncodeToString(h[:])
}

// refusal is the text of a server's refusal.
func refusal(err error) string {
	st := status.Convert(err)
	return fmt.Sprintf("%s: %s", st.Code(), st.Message())
}

// signedBundle returns the signed bundle ref names: the change's bundle
// given on the command line, else the one a server of the plan serves.
func (c *controller) signedBundle(ctx context.Context, ref rollout.BundleRef) (*bundlev1.SignedBundle, *bundlev1.Bundle, error) {
	sb := c.bundles[ref.Region]
	if sb == nil || sumOf(sb) != ref.SHA256 {
		sb = c.lastGood[ref.SHA256]
	}
	if sb == nil || sumOf(sb) != ref.SHA256 {
		var servers []string
		for _, s := range slices.Sorted(maps.Keys(c.rec.Servers)) {
			if c.rec.Servers[s].Region == ref.Region {
				servers = append(servers, s)
			}
		}
		for _, addr := range c.o.file.Regions[ref.Region] {
			if !slices.Contains(servers, addr) {
				servers = append(servers, addr)
			}
		}
		var err error
		if sb, err = c.fetchSigned(ctx, ref, servers); err != nil {
			return nil, nil, fmt.Errorf("bundle %s: not given (--bundles, --change-dir) and %w", ref, err)
		}
	}
	var b bundlev1.Bundle
	if err := proto.Unmarshal(sb.GetBundle(), &b); err != nil {
		return nil, nil, fmt.Errorf("bundle %s: %w", ref, err)
	}
	return sb, &b, nil
}

// fetchSigned asks servers, in turn, for the signed bundle they serve or
// served before, until one has ref.
func (c *controller) fetchSigned(ctx context.Context, ref rollout.BundleRef, servers []string) (*bundlev1.SignedBundle, error) {
	creds, err := kmsCreds(c.src, ref.Region)
	if err != nil {
		return nil, err
	}
	for _, addr := range servers {
		st, err := kmsCall(ctx, addr, creds, c.o.timeout, func(ctx context.Context, a kmsv1.KMSAdminClient) (*kmsv1.GetStatusResponse, error) {
			return a.GetStatus(ctx, &kmsv1.GetStatusRequest{IncludeBundle: true}, grpc.MaxCallRecvMsgSize(bundle.MaxSize+1<<20))
		})
		// The bundle a server serves, or the one it served before (each
		// server keeps that one for a rollback).
		for _, sb := range []*bundlev1.SignedBundle{st.GetServedBundle(), st.GetPreviousBundle()} {
			if err == nil && sb != nil && sumOf(sb) == ref.SHA256 {
				return sb, nil
			}
		}
	}
	return nil, fmt.Errorf("no server of %s serves it or served it last", ref.Region)
}

// dryRun runs the Safety Condition fleet-wide, then ApplyBundle with
// dry_run on every server of a.
func (c *controller) dryRun(ctx context.Context, a rollout.DryRunAction) error {
	sb, b, err := c.signedBundle(ctx, a.Bundle)
	if err != nil {
		return err
	}
	var why bytes.Buffer
	if _, err := fleetCheck(ctx, c.o, c.src, c.r, b, a.Servers, &why); err != nil {
		if !errors.Is(err, errReported) {
			return err
		}
		reason := strings.TrimSpace(why.String())
		fmt.Fprintln(c.stderr, reason)
		for _, s := range a.Servers {
			if err := c.feed(ctx, rollout.DryRunResult{Epoch: c.rec.Epoch, Server: s, Reason: "regionctl: " + reason}); err != nil {
				return err
			}
		}
		return nil
	}
	creds, err := kmsCreds(c.src, a.Region)
	if err != nil {
		return err
	}
	type answer struct {
		resp *kmsv1.ApplyBundleResponse
		err  error
	}
	answers := make([]answer, len(a.Servers))
	var wg sync.WaitGroup
	for i, addr := range a.Servers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			answers[i].resp, answers[i].err = kmsCall(ctx, addr, creds, c.o.timeout, func(ctx context.Context, k kmsv1.KMSAdminClient) (*kmsv1.ApplyBundleResponse, error) {
				return k.ApplyBundle(ctx, &kmsv1.ApplyBundleRequest{Bundle: sb, DryRun: true})
			})
		}()
	}
	wg.Wait()
	for i, addr := range a.Servers {
		ev := rollout.DryRunResult{Epoch: c.rec.Epoch, Server: addr, OK: answers[i].err == nil}
		if answers[i].err != nil {
			ev.Reason = refusal(answers[i].err)
			printApplyError(c.stderr, addr, answers[i].err)
		} else {
			ev.Serving = refOf(answers[i].resp.GetPrevious())
		}
		if err := c.feed(ctx, ev); err != nil {
			return err
		}
	}
	return nil
}

// apply applies the stage's bundle server by server, keeping first the
// signed bundle each serves (the content a rollback restores); it stops
// as soon as the record no longer asks for applies (a failure halted it, an
// operator paused or aborted it).
func (c *controller) apply(ctx context.Context, a rollout.ApplyAction) error {
	sb, _, err := c.signedBundle(ctx, a.Bundle)
	if err != nil {
		return err
	}
	creds, err := kmsCreds(c.src, a.Region)
	if err != nil {
		return err
	}
	for _, addr := range a.Servers {
		if c.rec.Phase != rollout.PhaseApplying || c.rec.Paused {
			return nil
		}
		st, err := kmsCall(ctx, addr, creds, c.o.timeout, func(ctx context.Context, k kmsv1.KMSAdminClient) (*kmsv1.GetStatusResponse, error) {
			return k.GetStatus(ctx, &kmsv1.GetStatusRequest{IncludeBundle: true}, grpc.MaxCallRecvMsgSize(bundle.MaxSize+1<<20))
		})
		if err != nil {
			if err := c.feed(ctx, rollout.ApplyFailed{Epoch: c.rec.Epoch, Server: addr, Reason: "reading what it serves before the apply: " + refusal(err)}); err != nil {
				return err
			}
			continue
		}
		if cur := st.GetServedBundle(); cur != nil && sumOf(cur) != a.Bundle.SHA256 {
			c.lastGood[sumOf(cur)] = cur
		}
		if _, ok := c.base[addr]; !ok && st.GetStats() != nil {
			// Not serving at the stage's baseline (it served nothing, or
			// was not ready): judged from now on. What it refused before
			// it served the change is not the change's doing.
			c.base[addr] = st.GetStats()
		}
		resp, err := kmsCall(ctx, addr, creds, c.o.timeout, func(ctx context.Context, k kmsv1.KMSAdminClient) (*kmsv1.ApplyBundleResponse, error) {
			return k.ApplyBundle(ctx, &kmsv1.ApplyBundleRequest{Bundle: sb})
		})
		serial, previous := resp.GetApplied().GetSerial(), refOf(resp.GetPrevious())
		if err != nil {
			printApplyError(c.stderr, addr, err)
			if !c.appliedDespite(ctx, addr, creds, a.Bundle, err) {
				if err := c.feed(ctx, rollout.ApplyFailed{Epoch: c.rec.Epoch, Server: addr, Reason: refusal(err)}); err != nil {
					return err
				}
				continue
			}
			// The answer was lost, not the apply: what the server served
			// just before it is what it served before the change.
			serial, previous = a.Bundle.Serial, refOf(st.GetBundle())
		}
		c.recordSerial(ctx, a.Region, serial)
		if err := c.feed(ctx, rollout.Applied{Epoch: c.rec.Epoch, Server: addr, Serial: serial, Previous: previous}); err != nil {
			return err
		}
	}
	return nil
}

// appliedDespite reports whether server addr serves ref although its
// ApplyBundle of ref failed with err. A refusal (a bad or unsafe bundle, a
// denied caller) changed nothing: the server checks everything before it
// persists and swaps. Any other failure (a deadline, a lost connection, an
// internal error) leaves the outcome unknown: the server may have applied
// the bundle and only its answer was lost. Recorded as not applied, such a
// server would be left out of the rollback and keep serving the change
// (and a canary's halt would end the rollout failed, with nothing to roll
// back), so the server is asked what it serves.
func (c *controller) appliedDespite(ctx context.Context, addr string, creds *identity.Credentials, ref rollout.BundleRef, err error) bool {
	switch status.Code(err) {
	case codes.InvalidArgument, codes.FailedPrecondition, codes.PermissionDenied, codes.Unauthenticated,
		codes.NotFound, codes.AlreadyExists, codes.OutOfRange, codes.Unimplemented:
		return false
	}
	st, err := kmsCall(ctx, addr, creds, c.o.timeout, func(ctx context.Context, k kmsv1.KMSAdminClient) (*kmsv1.GetStatusResponse, error) {
		return k.GetStatus(ctx, &kmsv1.GetStatusRequest{})
	})
	if err != nil {
		fmt.Fprintf(c.stderr, "%s: asking what it serves after the failed apply: %s; counted as not applied\n", addr, refusal(err))
		return false
	}
	if refOf(st.GetBundle()).SHA256 != ref.SHA256 {
		return false
	}
	fmt.Fprintf(c.stderr, "%s: serves %s although its apply failed: counted as applied (a rollback covers it)\n", addr, ref)
	return true
}

// measure reads the request stats of servers (GetStatus) and returns their
// readiness, error rate and p99 together, with each server's stats. With
// sinceBase, the rate and p99 are of the calls since the stage's baseline
// (c.base); a server that was not serving at the baseline is measured from
// just before its apply; one without a baseline (the controller was
// restarted since) or whose counters went back (it restarted) counts every
// call since it started. Without sinceBase (the baseline itself) they are of
// every call since each server started.
func (c *controller) measure(ctx context.Context, servers []string, sinceBase bool) (rollout.Metrics, map[string]*kmsv1.RequestStats) {
	type answer struct {
		st  *kmsv1.GetStatusResponse
		err error
	}
	answers := make([]answer, len(servers))
	var wg sync.WaitGroup
	for i, addr := range servers {
		creds, err := kmsCreds(c.src, c.rec.Servers[addr].Region)
		if err != nil {
			answers[i].err = err
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			answers[i].st, answers[i].err = kmsCall(ctx, addr, creds, c.o.timeout, func(ctx context.Context, k kmsv1.KMSAdminClient) (*kmsv1.GetStatusResponse, error) {
				return k.GetStatus(ctx, &kmsv1.GetStatusRequest{})
			})
		}()
	}
	wg.Wait()
	var m rollout.Metrics
	stats := map[string]*kmsv1.RequestStats{}
	var total requestDelta
	for i, addr := range servers {
		st := answers[i].st
		if answers[i].err != nil || st.GetState() != kmsv1.ServingState_SERVING_STATE_SERVING || st.GetStats() == nil {
			m.NotReady = append(m.NotReady, addr)
			continue
		}
		stats[addr] = st.GetStats()
		var base *kmsv1.RequestStats
		if sinceBase {
			base = c.base[addr]
		}
		total.add(deltaOf(base, st.GetStats()))
	}
	m.ErrorRate, m.P99 = total.rate(), total.p99()
	return m, stats
}

// requestDelta is calls counted between two RequestStats.
type requestDelta struct {
	requests, errors uint64
	bounds           []float64 // finite bucket bounds, seconds
	counts           []uint64  // cumulative, one more than bounds (+Inf)
}

// deltaOf is after minus before (nil, or counters that went back: after).
func deltaOf(before, after *kmsv1.RequestStats) requestDelta {
	d := requestDelta{requests: after.GetRequests(), errors: after.GetErrors()}
	for _, b := range after.GetLatency() {
		if !b.GetInfinite() {
			d.bounds = append(d.bounds, b.GetLeSeconds())
		}
		d.counts = append(d.counts, b.GetCount())
	}
	if before == nil || before.GetRequests() > after.GetRequests() || before.GetErrors() > after.GetErrors() || len(before.GetLatency()) != len(after.GetLatency()) {
		return d
	}
	d.requests -= before.GetRequests()
	d.errors -= before.GetErrors()
	for i, b := range before.GetLatency() {
		d.counts[i] -= min(b.GetCount(), d.counts[i])
	}
	return d
}

func (d *requestDelta) add(o requestDelta) {
	d.requests += o.requests
	d.errors += o.errors
	if d.counts == nil {
		d.bounds, d.counts = o.bounds, slices.Clone(o.counts)
		return
	}
	if slices.Equal(d.bounds, o.bounds) {
		for i := range d.counts {
			d.counts[i] += o.counts[i]
		}
	}
}

func (d requestDelta) rate() float64 {
	if d.requests == 0 {
		return 0
	}
	return math.Min(1, float64(d.errors)/float64(d.requests))
}

// p99 is the upper bound of the bucket holding the 99th percentile call; a
// percentile in the +Inf bucket is the highest finite bound (as
// Prometheus's histogram_quantile answers).
func (d requestDelta) p99() time.Duration {
	if len(d.counts) == 0 || d.counts[len(d.counts)-1] == 0 {
		return 0
	}
	target := uint64(math.Ceil(0.99 * float64(d.counts[len(d.counts)-1])))
	le := 0.0
	for i, n := range d.counts {
		if i < len(d.bounds) {
			le = d.bounds[i]
		}
		if n >= target {
			break
		}
	}
	return time.Duration(le * float64(time.Second))
}

// gate measures the stage's servers again and runs the golden probes of
// its regions on them.
func (c *controller) gate(ctx context.Context, a rollout.ProbeAction) error {
	m, _ := c.measure(ctx, a.Servers, true)
	records, err := c.r.listKeysets(ctx, "", false)
	if err != nil {
		return fmt.Errorf("reading the record for the golden probes: %w", err)
	}
	servers := c.byRegion(a.Servers)
	probes := map[string][]goldenProbe{}
	for region := range servers {
		probes[region], _ = goldenProbes(records, region)
	}
	failures, err := probeServers(ctx, c.src, servers, probes, c.o.timeout)
	if err != nil {
		return err
	}
	var pf []rollout.ProbeFailure
	for _, addr := range slices.Sorted(maps.Keys(failures)) {
		for _, f := range failures[addr] {
			pf = append(pf, rollout.ProbeFailure{Server: addr, Keyset: f.Keyset, KeyID: f.KeyID, Reason: f.Detail})
		}
	}
	return c.feed(ctx, rollout.GateResult{Epoch: c.rec.Epoch, Stage: a.Stage, After: m, Probes: pf})
}

// rollback makes a.Servers serve a.To's content again: the signed bundle
// they served before (kept when the stage applied, or read from a server
// still serving it), merged with what the change (a.From) made them serve
// so that the rollback too obeys the Safety Condition (rollbackContent:
// every version the change served decrypting stays decryptable, a keyset
// the change added stays while the Safety Condition refuses to drop it),
// re-signed at serial a.MinSerial, checked fleet-wide against the Safety
// Condition, then applied on each server. What could not be rolled back is
// said on stdout. A rollback that cannot be built, or that the Safety
// Condition or a server still refuses after all this, is reported failed
// (the record keeps asking for it: rollout resume retries).
func (c *controller) rollback(ctx context.Context, a rollout.RollbackAction) error {
	fail := func(servers []string, reason string) error {
		for _, s := range servers {
			c.rollbackFailed[s] = true
			if err := c.feed(ctx, rollout.RollbackFailed{Epoch: c.rec.Epoch, Server: s, Reason: reason}); err != nil {
				return err
			}
		}
		return nil
	}
	if a.To.IsZero() {
		return fail(a.Servers, "the server served no bundle before the rollout: there is nothing to roll back to")
	}
	if c.o.signingKey == "" {
		return fail(a.Servers, "no bundle-signing key (--signing-key, or signing_key in the config file) to sign the rollback bundle with")
	}
	_, last, err := c.signedBundle(ctx, a.To)
	if err != nil {
		return fail(a.Servers, "the last good content: "+err.Error())
	}
	// The change's content: what the servers may have served, and used,
	// since they applied it. Without it the rollback is the last good
	// content alone, which the fleet-wide check below judges against what
	// every server serves.
	var cur *bundlev1.Bundle
	if !a.From.IsZero() {
		if _, cur, err = c.signedBundle(ctx, a.From); err != nil {
			fmt.Fprintf(c.stderr, "rollback of %s: the change's content: %v; rolling back to the last good content alone\n", a.Region, err)
			cur = nil
		}
	}
	b, err := c.rollbackBundle(ctx, last, a)
	if err != nil {
		return fail(a.Servers, err.Error())
	}
	rb := rollbackContent(b, cur)
	if len(rb.added) > 0 {
		keep, err := c.refusedDrops(ctx, rb.bundle, rb.added, a.Servers)
		if err != nil {
			return fail(a.Servers, "judging the keysets the change added: "+err.Error())
		}
		rb.keepAdded(keep)
	}
	b = rb.bundle
	for _, n := range rb.notes {
		fmt.Fprintf(c.stdout, "rollback of %s: %s\n", a.Region, n)
	}
	key, err := bundle.ReadPrivateKey(c.o.signingKey)
	if err != nil {
		return fail(a.Servers, err.Error())
	}
	sb, err := bundle.Sign(b, key)
	clear(key)
	if err != nil {
		return fail(a.Servers, "signing the rollback bundle: "+err.Error())
	}
	var why bytes.Buffer
	if _, err := fleetCheck(ctx, c.o, c.src, c.r, b, a.Servers, &why); err != nil {
		if !errors.Is(err, errReported) {
			return err
		}
		fmt.Fprint(c.stderr, why.String())
		return fail(a.Servers, "the rollback bundle: "+strings.TrimSpace(why.String()))
	}
	creds, err := kmsCreds(c.src, a.Region)
	if err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "rolling back %s to the content of %s, as %s\n", strings.Join(a.Servers, " "), a.To, refString(bundle.Ref(sb, b)))
	for _, addr := range a.Servers {
		resp, err := kmsCall(ctx, addr, creds, c.o.timeout, func(ctx context.Context, k kmsv1.KMSAdminClient) (*kmsv1.ApplyBundleResponse, error) {
			return k.ApplyBundle(ctx, &kmsv1.ApplyBundleRequest{Bundle: sb})
		})
		if err != nil {
			printApplyError(c.stderr, addr, err)
			if err := fail([]string{addr}, refusal(err)); err != nil {
				return err
			}
			continue
		}
		c.recordSerial(ctx, a.Region, resp.GetApplied().GetSerial())
		if err := c.feed(ctx, rollout.RolledBack{Epoch: c.rec.Epoch, Server: addr, Serial: resp.GetApplied().GetSerial()}); err != nil {
			return err
		}
	}
	return nil
}

// recordSerial records serial as delivered to region (root.recordSerial)
// once a server applied it. A failure only warns: the apply stands, and the
// next apply of the rollout (or a push) records a floor at least as high.
func (c *controller) recordSerial(ctx context.Context, region string, serial uint64) {
	if err := c.r.recordSerial(ctx, region, serial); err != nil {
		fmt.Fprintf(c.stderr, "warning: %v\n", err)
	}
}

// rollbackBundle is last's content as a new bundle at serial a.MinSerial,
// by this controller, now, with the bundle it replaces as parent, and a
// shrink override naming the rollback (any override last carried was
// signed for another change); a partial build record stays (it describes
// the content).
func (c *controller) rollbackBundle(ctx context.Context, last *bundlev1.Bundle, a rollout.RollbackAction) (*bundlev1.Bundle, error) {
	b := proto.Clone(last).(*bundlev1.Bundle)
	if b.GetRegion() != a.Region {
		return nil, fmt.Errorf("the last good bundle is for region %s, not %s", b.GetRegion(), a.Region)
	}
	b.Serial = a.MinSerial
	now := clockNow(ctx)
	// A new bundle in today's format: it expires like any other.
	b.FormatVersion = bundle.FormatVersion
	b.CreatedAt = timestamppb.New(now)
	b.NotAfter = timestamppb.New(now.Add(bundle.DefaultValidity))
	b.CreatedBy = c.src.ID().String()
	// Going back to content the region served before is an intended shrink
	// of the change's bundle: the override says so, signed and audited by
	// every server (the Safety Condition still judges the rollback).
	b.ShrinkOverride = &bundlev1.ShrinkOverride{
		Reason:   fmt.Sprintf("rollback of rollout %s to the content of serial %d, served before it", c.rec.ID, last.GetSerial()),
		ForcedBy: c.src.ID().String(),
	}
	if sum, err := hex.DecodeString(a.From.SHA256); err == nil && !a.From.IsZero() {
		b.Parent = &bundlev1.BundleRef{Region: a.From.Region, Serial: a.From.Serial, Sha256: sum}
	}
	return b, nil
}

// rollbackMerge is a rollback bundle being built: the last good content
// merged with the change's (rollbackContent).
type rollbackMerge struct {
	bundle *bundlev1.Bundle
	// added are the keysets the change added, as it serves them; the
	// bundle lacks them until keepAdded puts some back.
	added []*bundlev1.KeysetConfig
	// notes say what the rollback does not restore, for the operator.
	notes []string
}

// rollbackContent merges into b (the last good content, re-stamped as the
// rollback bundle; changed in place) what cur (the change's content, the
// one the servers may have served and used since) requires for the
// rollback to obey the Safety Condition: a version the change served
// decrypting stays decryptable. regionctl cannot decrypt a keyset's copy,
// so it cannot re-status one; per keyset:
//
//   - in both: if cur's copy decrypts a version b's copy does not, the
//     rollback keeps cur's copy (with the lifecycle of its versions) and
//     b's config (ACL, TTL and its history, rotation period, regions,
//     encrypt limit): the keys stay as the change made them, the config is
//     rolled back; if cur's primary is another version than b's, the old
//     primary cannot be restored without the root KMS, and the notes say
//     so. Otherwise b's copy is restored as it was (a version the change
//     only promoted still decrypts there).
//   - only in b (the change removed it): restored from b.
//   - only in cur (the change added it): left out of b and returned in
//     added; the caller keeps those the Safety Condition refuses to drop
//     (keepAdded).
//
// With cur nil, b is the rollback as it is.
func rollbackContent(b, cur *bundlev1.Bundle) *rollbackMerge {
	m := &rollbackMerge{bundle: b}
	if cur == nil {
		return m
	}
	inLast := map[string]bool{}
	for _, k := range b.GetKeysets() {
		inLast[k.GetName()] = true
	}
	curBy := map[string]*bundlev1.KeysetConfig{}
	for _, k := range cur.GetKeysets() {
		curBy[k.GetName()] = k
		if !inLast[k.GetName()] {
			m.added = append(m.added, k)
		}
	}
	for _, k := range b.GetKeysets() {
		ck := curBy[k.GetName()]
		if ck == nil {
			continue
		}
		extra := decryptingOnlyIn(ck.GetKeyset(), k.GetKeyset())
		if len(extra) == 0 {
			continue
		}
		lastCopy := k.GetKeyset()
		lastPrimary, curPrimary := lastCopy.GetPrimaryKeyId(), ck.GetKeyset().GetPrimaryKeyId()
		k.Keyset = proto.Clone(ck.GetKeyset()).(*cryptov1.EncryptedKeyset)
		k.Lifecycle = nil
		for _, l := range ck.GetLifecycle() {
			k.Lifecycle = append(k.Lifecycle, proto.Clone(l).(*bundlev1.VersionLifecycle))
		}
		k.DestroyedKeyIds = slices.Clone(ck.GetDestroyedKeyIds())
		m.useRegionKey(k.GetKeyset().GetRegionKeyVersion())
		note := fmt.Sprintf("keyset %s: kept the keys the change made it serve (version(s) %s it added stay decryptable); its config is rolled back", k.GetName(), keyIDs(extra))
		if gone := decryptingOnlyIn(lastCopy, ck.GetKeyset()); len(gone) > 0 {
			note += fmt.Sprintf("; version(s) %s the change took out are not restored", keyIDs(gone))
		}
		if curPrimary != lastPrimary {
			note += fmt.Sprintf("; its primary stays version %d, not %d as before the change: only its config was rolled back (restoring the old primary needs a copy from the root KMS)", curPrimary, lastPrimary)
		}
		m.notes = append(m.notes, note)
	}
	return m
}

// keepAdded puts back, as the change serves them, the added keysets named
// in keep, and notes what the rollback keeps and drops.
func (m *rollbackMerge) keepAdded(keep map[string]bool) {
	for _, k := range m.added {
		if !keep[k.GetName()] {
			m.notes = append(m.notes, fmt.Sprintf("keyset %s, added by the change, is dropped (the Safety Condition allows it)", k.GetName()))
			continue
		}
		m.bundle.Keysets = append(m.bundle.Keysets, proto.Clone(k).(*bundlev1.KeysetConfig))
		m.useRegionKey(k.GetKeyset().GetRegionKeyVersion())
		m.notes = append(m.notes, fmt.Sprintf("keyset %s, added by the change, is kept as the change serves it: the Safety Condition refuses to drop it (it was used, or its use is unknown)", k.GetName()))
	}
	slices.SortFunc(m.bundle.Keysets, func(a, b *bundlev1.KeysetConfig) int { return strings.Compare(a.GetName(), b.GetName()) })
}

// useRegionKey lists region key version v in the bundle if it is not.
func (m *rollbackMerge) useRegionKey(v uint32) {
	if !slices.Contains(m.bundle.RegionKeyVersions, v) {
		m.bundle.RegionKeyVersions = append(m.bundle.RegionKeyVersions, v)
		slices.Sort(m.bundle.RegionKeyVersions)
	}
}

// decryptingOnlyIn returns the key IDs that decrypt in copy a and not in
// copy b, sorted.
func decryptingOnlyIn(a, b *cryptov1.EncryptedKeyset) []uint32 {
	inB := map[uint32]bool{}
	for _, v := range b.GetVersions() {
		if v.GetKeyId() == b.GetPrimaryKeyId() || decrypts(v.GetStatus()) {
			inB[v.GetKeyId()] = true
		}
	}
	var out []uint32
	for _, v := range a.GetVersions() {
		if (v.GetKeyId() == a.GetPrimaryKeyId() || decrypts(v.GetStatus())) && !inB[v.GetKeyId()] {
			out = append(out, v.GetKeyId())
		}
	}
	slices.Sort(out)
	return out
}

func keyIDs(ids []uint32) string {
	s := make([]string, len(ids))
	for i, id := range ids {
		s[i] = fmt.Sprint(id)
	}
	return strings.Join(s, ", ")
}

// refusedDrops returns the names of the keysets of added (keysets the
// change added) that the fleet-wide Safety Condition refuses to drop: b (the
// rollback without them) is judged against what every server of its region
// serves now, as fleetCheck judges a bundle, and every added keyset a
// refusal names is kept. A server that cannot be reached counts as in use
// (the fleet marks it unknown), so its added keysets are kept. Refusals of
// other keysets are left to the final fleetCheck.
func (c *controller) refusedDrops(ctx context.Context, b *bundlev1.Bundle, added []*bundlev1.KeysetConfig, servers []string) (map[string]bool, error) {
	regions := maps.Clone(c.o.file.Regions)
	if regions == nil {
		regions = map[string][]string{}
	}
	all := slices.Clone(servers)
	for _, s := range regions[b.GetRegion()] {
		if !slices.Contains(all, s) {
			all = append(all, s)
		}
	}
	regions[b.GetRegion()] = all
	obs, err := observe(ctx, c.src, regions, c.o.timeout)
	if err != nil {
		return nil, err
	}
	records, err := c.r.listKeysets(ctx, "", false)
	if err != nil {
		return nil, fmt.Errorf("reading the record for the safety check: %w", err)
	}
	record := map[string]safety.Keyset{}
	for _, rec := range records {
		record[rec.GetName()] = lifecycle.Keyset(rec)
	}
	isAdded := map[string]bool{}
	for _, k := range added {
		isAdded[k.GetName()] = true
	}
	next, fleet := bundleContent(b), obs.fleet()
	p := safety.Params{Window: c.o.propagationWindow()}
	now := clockNow(ctx)
	keep := map[string]bool{}
	for _, s := range obs.Regions[b.GetRegion()] {
		err := safety.CheckBundle(b.GetRegion(), servedContent(s.Status), next, record, fleet, safety.ScopeFleet, p, now)
		if err == nil {
			continue
		}
		var rs safety.Refusals
		if !errors.As(err, &rs) {
			return nil, fmt.Errorf("safety check: %w", err)
		}
		for _, r := range rs {
			if isAdded[r.Keyset] {
				keep[r.Keyset] = true
			}
		}
	}
	return keep, nil
}

// --- commands -------------------------------------------------------------

// parseID parses args, which may hold one rollout ID before or after the
// flags.
func parseID(fs *flag.FlagSet, args []string, required bool) (string, error) {
	var id string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		id, args = args[0], args[1:]
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return "", flag.ErrHelp
		}
		return "", errUsage
	}
	rest := fs.Args()
	if id == "" && len(rest) > 0 {
		id, rest = rest[0], rest[1:]
	}
	if len(rest) != 0 {
		return "", usageError(fs, "unexpected arguments: %v", rest)
	}
	if required && id == "" {
		return "", usageError(fs, "the rollout ID is required")
	}
	return id, nil
}

// changeFlags are where the change's signed bundles are.
type changeFlags struct{ dir, files string }

func (f *changeFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.dir, "change-dir", "", "directory of the change's signed bundles (*.bundle, one per region)")
	fs.StringVar(&f.files, "bundles", "", "comma-separated signed bundle files, one per region")
}

func (f *changeFlags) paths() ([]string, error) {
	switch {
	case f.dir != "" && f.files != "":
		return nil, errors.New("give --change-dir or --bundles, not both")
	case f.files != "":
		return identity.SplitList(f.files), nil
	case f.dir != "":
		paths, err := filepath.Glob(filepath.Join(f.dir, "*.bundle"))
		if err == nil && len(paths) == 0 {
			err = fmt.Errorf("%s holds no *.bundle file", f.dir)
		}
		return paths, err
	}
	return nil, nil
}

// readChange reads the signed bundles at paths (verified against the
// pinned keys if any are configured), by region.
func readChange(o *options, paths []string) (map[string]*bundlev1.SignedBundle, []rollout.BundleRef, error) {
	var pinned []ed25519.PublicKey
	for _, p := range o.signingPubs() {
		pub, err := bundle.ReadPublicKey(p)
		if err != nil {
			return nil, nil, err
		}
		pinned = append(pinned, pub)
	}
	out := map[string]*bundlev1.SignedBundle{}
	var refs []rollout.BundleRef
	for _, path := range paths {
		sb, err := readSignedBundle(path)
		if err != nil {
			return nil, nil, err
		}
		var b *bundlev1.Bundle
		if len(pinned) > 0 {
			if b, err = bundle.Verify(sb, pinned); err != nil {
				return nil, nil, fmt.Errorf("%s: %w", path, err)
			}
		} else {
			b = &bundlev1.Bundle{}
			if err := proto.Unmarshal(sb.GetBundle(), b); err != nil {
				return nil, nil, fmt.Errorf("%s does not hold a bundle: %w", path, err)
			}
		}
		if out[b.GetRegion()] != nil {
			return nil, nil, fmt.Errorf("%s: a second bundle for region %s", path, b.GetRegion())
		}
		out[b.GetRegion()] = sb
		refs = append(refs, refOf(bundle.Ref(sb, b)))
	}
	return out, refs, nil
}

func rolloutFlags(name string, stderr io.Writer) (*flag.FlagSet, *options) {
	fs := newFlags("rollout "+name, stderr)
	o := &options{}
	o.register(fs, withRoot|withSigningKey|withSigningPub|withWindow)
	return fs, o
}

func rolloutStart(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, o := rolloutFlags("start", stderr)
	var (
		change  changeFlags
		nr      newRollout
		regions string
	)
	change.register(fs)
	fs.StringVar(&nr.why, "reason", "", "why (a ticket, an incident); recorded and audited (required)")
	fs.BoolVar(&nr.dryRun, "dry-run", false, "print the plan; store and change nothing")
	fs.StringVar(&regions, "regions", "", "comma-separated region order, the first is the canary region (default: the bundles' regions, sorted)")
	nr.registerStages(fs)
	fs.StringVar(&nr.id, "id", "", "the rollout's ID (default: made from the time)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := checkReasonFlag(nr.why); err != nil {
		return usageError(fs, "--reason: %v", err)
	}
	if strings.TrimSpace(nr.why) == "" {
		return usageError(fs, "--reason is required")
	}
	nr.regions = identity.SplitList(regions)
	paths, err := change.paths()
	if err != nil {
		return usageError(fs, "%v", err)
	}
	if len(paths) == 0 {
		return usageError(fs, "--change-dir or --bundles is required")
	}
	if err := o.load(); err != nil {
		return err
	}
	if !nr.dryRun && o.signingKey == "" {
		return usageError(fs, "--signing-key (or signing_key in the config file) is required: a failed stage is rolled back with a bundle it signs")
	}
	return startRollout(ctx, o, paths, nr, stdout, stderr)
}

// newRollout is what a new rollout is asked for.
type newRollout struct {
	why, id string
	// regions is the region order (the first is the canary region); nil:
	// the bundles' regions, sorted.
	regions      []string
	canary, wave int
	bake         time.Duration
	dryRun       bool
}

// registerStages registers the flags that shape a rollout's stages.
func (nr *newRollout) registerStages(fs *flag.FlagSet) {
	fs.IntVar(&nr.canary, "canary", 0, "servers of the first region in the canary stage (default 1)")
	fs.IntVar(&nr.wave, "wave", 0, "regions per stage after the first region (default 1)")
	fs.DurationVar(&nr.bake, "bake", 0, "bake time of every stage (default: canary 10m, region 30m, wave 1h)")
}

// startRollout plans the staged rollout of the signed bundles at paths
// (one per region), stores it in the root KMS unless another rollout in
// flight holds one of its regions, and drives it to its end: canary, the
// rest of the first region, the other regions in waves, each stage dry-run,
// applied, baked and gated, a failed gate rolled back. The caller has
// loaded o and checked its signing key.
func startRollout(ctx context.Context, o *options, paths []string, nr newRollout, stdout, stderr io.Writer) error {
	bundles, refs, err := readChange(o, paths)
	if err != nil {
		return err
	}
	if len(o.file.Regions) == 0 {
		return fmt.Errorf("no KMS servers configured (regions in the config file)")
	}
	c, err := newController(ctx, o, stdout, stderr)
	if err != nil {
		return err
	}
	defer c.Close()
	c.bundles = bundles
	plan, err := rollout.NewPlan(rollout.Change{Bundles: refs, By: c.src.ID().String(), Why: nr.why}, o.file.Regions,
		rollout.Options{Regions: nr.regions, Canary: nr.canary, WaveSize: nr.wave, CanaryBake: nr.bake, RegionBake: nr.bake, WaveBake: nr.bake})
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, plan)
	if nr.dryRun {
		fmt.Fprintln(stdout, "dry run: nothing stored, nothing changed")
		return nil
	}
	// The root KMS refuses a second rollout for a busy region in the same
	// write; asking first gives the clearer answer.
	if err := checkRegionsFree(ctx, c.store, plan); err != nil {
		return err
	}
	now := clockNow(ctx)
	id := nr.id
	if id == "" {
		var b [3]byte
		_, _ = rand.Read(b[:])
		id = now.UTC().Format("20060102-150405") + "-" + hex.EncodeToString(b[:])
	}
	if err := c.save(ctx, rollout.NewRecord(id, plan, c.owner(), 1, now)); err != nil {
		return fmt.Errorf("storing rollout %s: %w", id, err)
	}
	fmt.Fprintf(stdout, "rollout %s stored (epoch 1, owner %s)\n", id, c.rec.Owner)
	if err := c.feed(ctx, rollout.Started{Epoch: c.rec.Epoch}); err != nil {
		return err
	}
	return c.run(ctx)
}

// takeOver makes c the rollout's controller at a new epoch.
func (c *controller) takeOver(ctx context.Context) error {
	return c.feed(ctx, rollout.TookOver{Epoch: c.rec.Epoch + 1, By: c.owner()})
}

func rolloutResume(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, o := rolloutFlags("resume", stderr)
	var change changeFlags
	change.register(fs)
	id, err := parseID(fs, args, true)
	if err != nil {
		return err
	}
	paths, err := change.paths()
	if err != nil {
		return usageError(fs, "%v", err)
	}
	if err := o.load(); err != nil {
		return err
	}
	c, err := newController(ctx, o, stdout, stderr)
	if err != nil {
		return err
	}
	defer c.Close()
	if len(paths) > 0 {
		if c.bundles, _, err = readChange(o, paths); err != nil {
			return err
		}
	}
	if err := c.load(ctx, id); err != nil {
		return err
	}
	if err := c.takeOver(ctx); err != nil {
		return err
	}
	if c.rec.Paused {
		if err := c.feed(ctx, rollout.Resume{Epoch: c.rec.Epoch, By: c.src.ID().String()}); err != nil {
			return err
		}
	}
	return c.run(ctx)
}

func rolloutRollback(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, o := rolloutFlags("rollback", stderr)
	var why string
	fs.StringVar(&why, "reason", "", "why (required)")
	id, err := parseID(fs, args, true)
	if err != nil {
		return err
	}
	if strings.TrimSpace(why) == "" {
		return usageError(fs, "--reason is required")
	}
	if err := o.load(); err != nil {
		return err
	}
	c, err := newController(ctx, o, stdout, stderr)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.load(ctx, id); err != nil {
		return err
	}
	if err := c.takeOver(ctx); err != nil {
		return err
	}
	if err := c.feed(ctx, rollout.RollbackRequested{Epoch: c.rec.Epoch, By: c.src.ID().String(), Why: why}); err != nil {
		return err
	}
	c.rollbackAsked = true
	return c.run(ctx)
}

// rolloutOperator is pause and abort: an operator's event on the stored
// record, at its epoch (the controller running it sees the change at its
// next write).
func rolloutOperator(name string, event func(epoch uint64, by, why string) rollout.Event) command {
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		fs, o := rolloutFlags(name, stderr)
		var why string
		fs.StringVar(&why, "reason", "", "why (required)")
		id, err := parseID(fs, args, true)
		if err != nil {
			return err
		}
		if strings.TrimSpace(why) == "" {
			return usageError(fs, "--reason is required")
		}
		if err := o.load(); err != nil {
			return err
		}
		c, err := newController(ctx, o, stdout, stderr)
		if err != nil {
			return err
		}
		defer c.Close()
		if err := c.load(ctx, id); err != nil {
			return err
		}
		if err := c.feed(ctx, event(c.rec.Epoch, c.src.ID().String(), why)); err != nil {
			return err
		}
		fmt.Fprintln(stdout, rollout.Status(c.rec))
		return nil
	}
}

func rolloutStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, o := rolloutFlags("status", stderr)
	fs.BoolVar(&o.json, "json", false, "print JSON (the record)")
	id, err := parseID(fs, args, false)
	if err != nil {
		return err
	}
	if err := o.load(); err != nil {
		return err
	}
	c, err := newController(ctx, o, stdout, stderr)
	if err != nil {
		return err
	}
	defer c.Close()
	if id != "" {
		if err := c.load(ctx, id); err != nil {
			return err
		}
		if o.json {
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			return enc.Encode(c.rec)
		}
		fmt.Fprintln(stdout, rollout.Status(c.rec))
		return nil
	}
	all, err := c.store.List(ctx, false)
	if err != nil {
		return fmt.Errorf("listing rollouts: %w", err)
	}
	recs := []rollout.Record{}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tPHASE\tSTAGE\tREGIONS\tEPOCH\tBY\tREASON")
	for _, p := range all {
		rec, err := decodeRollout(p)
		if err != nil {
			fmt.Fprintf(stderr, "%v\n", err)
			continue
		}
		recs = append(recs, rec)
		phase := string(rec.Phase)
		if rec.Paused {
			phase += " (paused)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%d/%d\t%s\t%d\t%s\t%s\n", rec.ID, phase, rec.Stage+1, len(rec.Plan.Stages), strings.Join(rec.Plan.Regions, ","), rec.Epoch, rec.Plan.Change.By, rec.Plan.Change.Why)
	}
	if o.json {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(recs)
	}
	return tw.Flush()
}

var rolloutCommands = map[string]command{
	"start":  rolloutStart,
	"status": rolloutStatus,
	"resume": rolloutResume,
	"pause": rolloutOperator("pause", func(epoch uint64, by, why string) rollout.Event {
		return rollout.Pause{Epoch: epoch, By: by, Why: why}
	}),
	"abort": rolloutOperator("abort", func(epoch uint64, by, why string) rollout.Event {
		return rollout.Abort{Epoch: epoch, By: by, Why: why}
	}),
	"rollback": rolloutRollback,
}
