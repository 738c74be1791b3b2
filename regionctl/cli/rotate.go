package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/lifecycle"
	"github.com/cairnkms/cairn/internal/safety"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/regionctl/compile"
)

// rotateCmd is rotate --due: every due lifecycle step of every keyset,
// idempotent, safe to run from cron.
func rotateCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("rotate", stderr)
	o := &options{}
	o.register(fs, withRoot|withTeams|withSigningKey|withWindow)
	var (
		due, dryRun  bool
		destroyDelay time.Duration
		outDir       string
		noPush       string
		encLimit     uint64
		rotateAt     float64
		stages       newRollout
		order        string
	)
	fs.BoolVar(&due, "due", false, "do every step that is due (required)")
	fs.BoolVar(&dryRun, "dry-run", false, "observe and record, print the due steps, change nothing else")
	fs.DurationVar(&destroyDelay, "destroy-delay", 24*time.Hour, "delay of scheduled destructions")
	fs.StringVar(&outDir, "out-dir", "", "where to write the bundles built (default: a temporary directory)")
	fs.StringVar(&noPush, "no-push", "", "comma-separated regions whose bundles are not rolled out (later by bundle build and rollout start); the Safety Condition waits for them")
	fs.Uint64Var(&encLimit, "encrypt-limit", 0, "AES-GCM message budget: encryptions per key version, fleet-wide, written into the bundles built (default: the config file's message_budget.limit, else 2^32)")
	fs.Float64Var(&rotateAt, "rotate-at", 0, "add a version once the primary's recorded encryptions reach this fraction of the message budget (default: the config file's message_budget.rotate_at, else 0.25)")
	fs.StringVar(&order, "order", "", "comma-separated region order of the rollout of the bundles built, the first is the canary region (default: the regions, sorted)")
	stages.registerStages(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if !due {
		return usageError(fs, "--due is required (rotating one keyset is regionctl keyset rotate NAME)")
	}
	if destroyDelay <= 0 {
		return usageError(fs, "--destroy-delay must be positive")
	}
	if err := o.load(); err != nil {
		return err
	}
	// The flags win over the file. Set into it, they reach whatever reads
	// the budget from it: the due check below and the bundles built
	// (compile.Input.EncryptLimit is o.file.encryptLimit()).
	if o.set["encrypt-limit"] || o.set["rotate-at"] {
		mb := FileBudget{}
		if o.file.MessageBudget != nil {
			mb = *o.file.MessageBudget
		}
		o.file.MessageBudget = &mb
		if o.set["encrypt-limit"] {
			o.file.MessageBudget.Limit = encLimit
		}
		if o.set["rotate-at"] {
			if err := checkRotateAt("--rotate-at", rotateAt); err != nil {
				return usageError(fs, "%v", err)
			}
			o.file.MessageBudget.RotateAt = &rotateAt
		}
	}
	budget := o.file.budget()
	held := identity.SplitList(noPush)
	regions, err := o.regions("")
	if err != nil {
		return err
	}
	// A region these flags name must be one of the fleet's: a misspelled
	// --no-push would otherwise hold nothing back and let the region it
	// meant be rolled out.
	for _, f := range []struct {
		name    string
		regions []string
	}{{"--order", identity.SplitList(order)}, {"--no-push", held}} {
		for _, region := range f.regions {
			if _, ok := regions[region]; !ok {
				return usageError(fs, "%s: region %q has no KMS servers in the config file", f.name, region)
			}
		}
	}
	r, err := o.root()
	if err != nil {
		return err
	}
	defer r.Close()
	var errs []error

	// 1. Observe and record every region.
	obs, err := observe(ctx, r.src, regions, o.timeout)
	if err != nil {
		return err
	}
	records, err := r.listKeysets(ctx, "", true)
	if err != nil {
		return fmt.Errorf("reading the record: %w", err)
	}
	if err := obs.record(ctx, r, records, stdout); err != nil {
		errs = append(errs, err)
	}
	for _, region := range sortedRegions(regions) {
		for _, s := range obs.unreachable(region) {
			errs = append(errs, fmt.Errorf("region %s: %s unreachable: %v", region, s.Addr, s.Err))
		}
	}
	// Read again: the record now holds what was just observed. The first
	// read's copies say what each region should serve (recording usage
	// changes no copy).
	withCopies := records
	if records, err = r.listKeysets(ctx, "", false); err != nil {
		return fmt.Errorf("reading the record: %w", err)
	}

	// 2. Every due step of every keyset.
	now := clockNow(ctx)
	p := safety.Params{Window: o.propagationWindow()}
	fleet := obs.fleet()
	affected := map[string]bool{}
	var changed []string // the keysets whose bundles must follow
	for _, rec := range records {
		ch, err := dueSteps(ctx, r, rec, fleet, p, budget, now, destroyDelay, dryRun, stdout)
		if err != nil {
			errs = append(errs, err)
		}
		if ch {
			changed = append(changed, rec.GetName())
			for _, region := range rec.GetRegions() {
				affected[region] = true
			}
		}
	}

	// A region with a reachable server that serves nothing (restarted with
	// an empty state directory) needs its bundle again: until then the
	// region's usage cannot be recorded and the root KMS refuses every
	// promotion and retirement of its keysets. So does a region (not held
	// back by --no-push) a server of which serves a keyset otherwise than
	// the record had it before this run's steps: an earlier run's rollout
	// failed, met another rollout in flight, or was held back; no later step
	// may be due to carry it.
	for _, region := range sortedRegions(regions) {
		for _, srv := range obs.Regions[region] {
			if srv.Err == nil && srv.Status.GetState() == kmsv1.ServingState_SERVING_STATE_NOT_READY && srv.Status.GetBundle() == nil {
				fmt.Fprintf(stdout, "serves nothing: region %s: %s; its bundle is rolled out again\n", region, srv.Addr)
				affected[region] = true
				continue
			}
			if srv.Err == nil && !affected[region] && !slices.Contains(held, region) {
				if ks := behindRecord(withCopies, region, srv.Status); ks != "" {
					fmt.Fprintf(stdout, "behind the record: region %s: %s serves keyset %s otherwise than the record has it; its bundle is rolled out again\n", region, srv.Addr, ks)
					affected[region] = true
				}
			}
		}
	}

	// 3. Build every affected region's bundle and roll them out together,
	// staged: never every region at once (see startRollout).
	if len(affected) > 0 && !dryRun {
		if o.teams == "" || o.signingKey == "" {
			errs = append(errs, fmt.Errorf("regions %v need a new bundle, but teams and signing_key are not configured", slices.Sorted(maps.Keys(affected))))
			return errors.Join(errs...)
		}
		dir := outDir
		if dir == "" {
			if dir, err = os.MkdirTemp("", "regionctl-rotate-"); err != nil {
				return err
			}
			defer os.RemoveAll(dir)
		}
		var paths, built []string
		for _, region := range slices.Sorted(maps.Keys(affected)) {
			switch _, ok := regions[region]; {
			case slices.Contains(held, region):
				fmt.Fprintf(stdout, "not rolled out: region %s (--no-push): roll its bundle out with bundle build and rollout start\n", region)
				continue
			case !ok:
				errs = append(errs, fmt.Errorf("region %s: no KMS servers configured; its bundle was not built", region))
				continue
			}
			// This run's observation is current: nothing was pushed since.
			path := filepath.Join(dir, region+".bundle")
			if _, err := buildBundle(ctx, o, r, buildRequest{region: region, out: path, obs: obs}, stdout, stderr); err != nil {
				errs = append(errs, fmt.Errorf("region %s: %w", region, err))
				continue
			}
			paths, built = append(paths, path), append(built, region)
		}
		if len(paths) > 0 {
			stages.why = rotateReason(changed)
			stages.regions = rolloutOrder(identity.SplitList(order), built)
			switch err := startRollout(ctx, o, paths, stages, stdout, stderr); {
			case errors.Is(err, errReported): // its details are printed: not lost among errs
				errs = append(errs, fmt.Errorf("the rollout of the bundles of %s did not complete (see above)", strings.Join(built, ", ")))
			case err != nil:
				errs = append(errs, fmt.Errorf("the rollout of the bundles of %s: %w", strings.Join(built, ", "), err))
			}
		}
	}
	return errors.Join(errs...)
}

// behindRecord returns the first keyset of region (by name) that a server
// whose status is st serves otherwise than the record's copy for the region
// has it (not at all, with another primary, or another decrypt set), or ""
// if it serves every one as recorded. Keysets the record has for other
// regions only, and keysets the server serves that the record lacks, are
// not its business.
func behindRecord(records []*statev1.KeysetRecord, region string, st *kmsv1.GetStatusResponse) string {
	served := servedContent(st)
	for _, rec := range records {
		c := compile.CopyFor(rec, region)
		if c == nil {
			continue
		}
		vs, ok := served[rec.GetName()]
		if !ok || !vs[c.GetPrimaryKeyId()].Primary {
			return rec.GetName()
		}
		want := 0
		for _, v := range c.GetVersions() {
			if decrypts(v.GetStatus()) {
				want++
				if !vs[v.GetKeyId()].Decrypts {
					return rec.GetName()
				}
			}
		}
		for _, v := range vs {
			if v.Decrypts {
				want--
			}
		}
		if want != 0 { // the server decrypts with a version the record does not
			return rec.GetName()
		}
	}
	return ""
}

// rolloutOrder is the region order of a rollout of the bundles built: the
// regions of order that were built, in its order (its first is the canary
// region when it was built), then the other regions built, sorted.
func rolloutOrder(order, built []string) []string {
	var out []string
	for _, r := range order {
		if slices.Contains(built, r) && !slices.Contains(out, r) {
			out = append(out, r)
		}
	}
	for _, r := range slices.Sorted(slices.Values(built)) {
		if !slices.Contains(out, r) {
			out = append(out, r)
		}
	}
	return out
}

// rotateReason is the recorded reason of a rotate --due rollout: the
// keysets whose lifecycle steps it carries (bundles built again for servers
// that serve nothing or are behind the record may carry none).
func rotateReason(keysets []string) string {
	why := "regionctl rotate --due: bundles again for servers that serve nothing or are behind the record"
	if len(keysets) > 0 {
		why = "regionctl rotate --due: the lifecycle steps of " + strings.Join(keysets, ", ")
	}
	if len(why) > bundle.MaxReasonLen {
		why = why[:bundle.MaxReasonLen-3] + "..."
	}
	return why
}

// dueSteps does the due steps of one keyset and reports whether the record
// changed in a way the bundles must follow. Refusals from the root KMS
// (FAILED_PRECONDITION) are "not yet", not errors.
func dueSteps(ctx context.Context, r *root, rec *statev1.KeysetRecord, fleet safety.Fleet, p safety.Params, mb messageBudget, now time.Time, destroyDelay time.Duration, dryRun bool, w io.Writer) (bool, error) {
	name := rec.GetName()
	changed := false
	var errs []error
	do := func(step statev1.KeysetStep, keyID uint32, what string) {
		if dryRun {
			fmt.Fprintf(w, "due: keyset %s: %s\n", name, what)
			return
		}
		req := &rootkmsv1.UpdateKeysetRequest{Name: name, Step: step, KeyId: keyID}
		if step == statev1.KeysetStep_KEYSET_STEP_SCHEDULE_DESTROY {
			req.DestroyDelay = durationpb.New(destroyDelay)
		}
		if step == statev1.KeysetStep_KEYSET_STEP_ADD_VERSION {
			for _, v := range rec.GetVersions() {
				if v.GetState() == statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY {
					req.Template = v.GetTemplate()
				}
			}
		}
		got, err := r.update(ctx, req)
		switch {
		case status.Code(err) == codes.FailedPrecondition:
			fmt.Fprintf(w, "not yet: keyset %s: %s: %s\n", name, what, status.Convert(err).Message())
		case err != nil:
			errs = append(errs, fmt.Errorf("keyset %s: %s: %w", name, what, err))
		default:
			fmt.Fprintf(w, "done: keyset %s: %s\n", name, describeStep(req, got))
			if step != statev1.KeysetStep_KEYSET_STEP_SCHEDULE_DESTROY {
				changed = true
			}
		}
	}
	notYet := func(what string, err error) {
		var ref *safety.Refusal
		if errors.As(err, &ref) && !ref.Earliest.IsZero() {
			fmt.Fprintf(w, "not yet: keyset %s: %s: earliest safe time %s (%s)\n", name, what, tsTime(ref.Earliest), blockers(ref))
			return
		}
		fmt.Fprintf(w, "not yet: keyset %s: %s: %v\n", name, what, err)
	}
	k := lifecycle.Keyset(rec)
	var newestWaiting *statev1.KeysetVersionRecord
	for _, v := range rec.GetVersions() {
		if waiting(rec, v) {
			newestWaiting = v
		}
	}
	// Add a version when the primary's rotation period has run out or its
	// message budget is spent to rotate_at, and no newer version is waiting.
	if why, due := rotationDue(rec, mb, now); due {
		do(statev1.KeysetStep_KEYSET_STEP_ADD_VERSION, 0, "add a version ("+why+")")
	}
	// Promote the waiting version once every region served it for the
	// window (the root KMS checks again).
	if newestWaiting != nil {
		id := newestWaiting.GetKeyId()
		what := fmt.Sprintf("promote version %d", id)
		if err := safety.CheckPromote(k, id, fleet, safety.ScopeFleet, p, now); err != nil {
			notYet(what, err)
		} else {
			do(statev1.KeysetStep_KEYSET_STEP_PROMOTE, id, what)
		}
	}
	for _, v := range rec.GetVersions() {
		id := v.GetKeyId()
		switch v.GetState() {
		case statev1.KeysetVersionState_KEYSET_VERSION_STATE_ENABLED:
			if waiting(rec, v) {
				continue
			}
			what := fmt.Sprintf("disable version %d", id)
			if err := safety.CheckRetire(k, id, fleet, safety.ScopeFleet, p, now); err != nil {
				notYet(what, err)
				continue
			}
			do(statev1.KeysetStep_KEYSET_STEP_DISABLE, id, what)
		case statev1.KeysetVersionState_KEYSET_VERSION_STATE_DISABLED:
			do(statev1.KeysetStep_KEYSET_STEP_SCHEDULE_DESTROY, id, fmt.Sprintf("schedule version %d for destruction in %s", id, destroyDelay))
		case statev1.KeysetVersionState_KEYSET_VERSION_STATE_DESTROY_SCHEDULED:
			if t := lifecycle.Time(v.GetDestroyAfter()); t.After(now) {
				fmt.Fprintf(w, "not yet: keyset %s: destroy version %d: earliest safe time %s\n", name, id, tsTime(t))
				continue
			}
			do(statev1.KeysetStep_KEYSET_STEP_DESTROY, id, fmt.Sprintf("destroy version %d", id))
		}
	}
	return changed, errors.Join(errs...)
}

// rotationDue reports whether keyset rec needs a new version at now, and
// why: its primary's rotation period has run out, or the primary's recorded
// fleet-wide encryptions reached mb.rotateAt of the message budget. Never
// while a newer version waits to be promoted (its promotion is the
// rotation) or without a primary.
func rotationDue(rec *statev1.KeysetRecord, mb messageBudget, now time.Time) (why string, due bool) {
	var primary *statev1.KeysetVersionRecord
	for _, v := range rec.GetVersions() {
		switch {
		case v.GetState() == statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY:
			primary = v
		case waiting(rec, v):
			return "", false
		}
	}
	if primary == nil {
		return "", false
	}
	var whys []string
	// The period runs from the primary's creation, not its promotion: the
	// promotion waits for every region to serve the version for the window
	// (a day or more with a lagging region), and counting from it would add
	// that wait to every period (11 rotations a year at 30 days).
	if rp := rec.GetRotationPeriod().AsDuration(); rp > 0 && primary.GetCreatedAt() != nil && !primary.GetCreatedAt().AsTime().Add(rp).After(now) {
		whys = append(whys, "primary created "+ts(primary.GetCreatedAt())+", rotation period "+rp.String())
	}
	if n := primary.GetEncryptCount(); float64(n) >= mb.rotateAt*float64(mb.limit) {
		whys = append(whys, fmt.Sprintf("message budget: %s of %s encryptions, rotate at %g", count(n), count(mb.limit), mb.rotateAt))
	}
	return strings.Join(whys, "; "), len(whys) > 0
}

// count formats an encryption count: exact below a million, else in short
// scientific notation (1.1e9).
func count(n uint64) string {
	if n < 1_000_000 {
		return strconv.FormatUint(n, 10)
	}
	m, e, _ := strings.Cut(strconv.FormatFloat(float64(n), 'e', 1, 64), "e")
	exp, _ := strconv.Atoi(e)
	return m + "e" + strconv.Itoa(exp)
}
