package cli

import (
	"context"
	"crypto/ed25519"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/atomicfile"
	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/lifecycle"
	regionname "github.com/cairnkms/cairn/internal/region"
	"github.com/cairnkms/cairn/internal/safety"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	"github.com/cairnkms/cairn/regionctl/compile"
	"github.com/cairnkms/cairn/regionctl/config"
)

func bundleBuild(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("bundle build", stderr)
	o := &options{}
	o.register(fs, withRoot|withKMS|withTeams|withSigningKey|withWindow)
	var (
		region, out, by string
		serial          uint64
	)
	fs.StringVar(&region, "region", "", "the bundle's region (required)")
	fs.Uint64Var(&serial, "serial", 0, "the bundle's serial (default: one above the highest serial any server of the region serves)")
	fs.StringVar(&out, "out", "", "where to write the signed bundle (required)")
	fs.StringVar(&by, "created-by", "", "SPIFFE ID recorded as the bundle's author (default: the identity's ID)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if region == "" || out == "" {
		return usageError(fs, "--region and --out are required")
	}
	if err := regionname.ValidName(region); err != nil {
		return usageError(fs, "--region: %v", err)
	}
	if by != "" {
		if _, err := identity.Parse(by); err != nil {
			return usageError(fs, "--created-by: %v", err)
		}
	}
	if err := o.load(); err != nil {
		return err
	}
	if o.teams == "" || o.signingKey == "" || len(o.rootAddrs()) == 0 {
		return usageError(fs, "--rootkms, --teams and --signing-key (or rootkms, teams and signing_key in the config file) are required")
	}
	r, err := o.root()
	if err != nil {
		return err
	}
	defer r.Close()
	_, err = buildBundle(ctx, o, r, buildRequest{region: region, serial: serial, out: out, createdBy: by}, stdout, stderr)
	return err
}

type buildRequest struct {
	region, out, createdBy string
	serial                 uint64
	// obs, if set, is a fresh observation of the region's servers (for the
	// serial and the parent).
	obs *observation
}

// buildBundle compiles, signs and writes one region's bundle, or refuses
// (printing every problem, writing nothing).
func buildBundle(ctx context.Context, o *options, r *root, req buildRequest, stdout, stderr io.Writer) (*bundlev1.SignedBundle, error) {
	by := req.createdBy
	if by == "" {
		by = r.src.ID().String()
	}
	author, err := identity.Parse(by)
	if err != nil {
		return nil, err
	}
	key, err := bundle.ReadPrivateKey(o.signingKey)
	if err != nil {
		return nil, err
	}
	defer clear(key)
	var problems []string
	good, bad, err := config.LoadDir(o.teams, author.TrustDomain())
	if err != nil {
		return nil, err
	}
	for _, e := range bad {
		problems = append(problems, fmt.Sprintf("team file %s: %s", e.File, strings.ReplaceAll(e.Err.Error(), "\n", "\n    ")))
	}
	records, err := r.listKeysets(ctx, req.region, true)
	if status.Code(err) == codes.NotFound {
		problems = append(problems, fmt.Sprintf("region %s is unknown to the root KMS (%s)", req.region, status.Convert(err).Message()))
	} else if err != nil {
		return nil, fmt.Errorf("reading the record: %w", err)
	}
	serial, parent := req.serial, (*bundlev1.BundleRef)(nil)
	if serial == 0 || req.obs != nil {
		obs := req.obs
		if obs == nil {
			regions, err := o.regions(req.region)
			if err != nil {
				return nil, fmt.Errorf("no --serial, and the region's servers are unknown to ask for theirs: %w", err)
			}
			if obs, err = observe(ctx, r.src, regions, o.timeout); err != nil {
				return nil, err
			}
		}
		if down := obs.unreachable(req.region); len(down) > 0 && serial == 0 {
			for _, s := range down {
				fmt.Fprintf(stderr, "%s: unreachable: %v\n", s.Addr, s.Err)
			}
			return nil, fmt.Errorf("no --serial, and %d server(s) of %s did not say which serial they serve", len(down), req.region)
		}
		if serial == 0 {
			serial = obs.maxSerial(req.region) + 1
		}
		parent = commonRef(obs.Regions[req.region])
	}
	if len(problems) == 0 || records != nil {
		res, err := compile.Compile(compile.Input{Region: req.region, Serial: serial, CreatedBy: author.String(), CreatedAt: clockNow(ctx),
			Parent: parent, Teams: good, Record: records, Window: o.propagationWindow(), EncryptLimit: o.file.encryptLimit()})
		if err != nil {
			return nil, err
		}
		for _, p := range res.Problems {
			problems = append(problems, p.String())
		}
		if len(problems) == 0 {
			return writeBundle(res.Bundle, key, req.out, stdout)
		}
	}
	fmt.Fprintf(stderr, "REFUSED: the %s bundle cannot hold every keyset; no bundle written. %d problem(s):\n", req.region, len(problems))
	for _, p := range problems {
		fmt.Fprintf(stderr, "  %s\n", p)
	}
	return nil, errReported
}

// commonRef is the bundle every server serves, if they all serve the same.
func commonRef(servers []serverObs) *bundlev1.BundleRef {
	var ref *bundlev1.BundleRef
	for _, s := range servers {
		b := s.Status.GetBundle()
		if s.Err != nil || b == nil {
			return nil
		}
		if ref != nil && !proto.Equal(ref, b) {
			return nil
		}
		ref = b
	}
	return ref
}

func writeBundle(b *bundlev1.Bundle, key ed25519.PrivateKey, out string, stdout io.Writer) (*bundlev1.SignedBundle, error) {
	sb, err := bundle.Sign(b, key)
	if err != nil {
		return nil, err
	}
	data, err := proto.Marshal(sb)
	if err != nil {
		return nil, fmt.Errorf("encoding the signed bundle: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o700); err != nil {
		return nil, err
	}
	if err := atomicfile.Write(out, data, 0o600); err != nil {
		return nil, err
	}
	fmt.Fprintf(stdout, "bundle %s, %d keyset(s), region key versions %v, signed by key %s\nwritten to %s\n",
		refString(bundle.Ref(sb, b)), len(b.GetKeysets()), b.GetRegionKeyVersions(), sb.GetSigningKeyId(), out)
	return sb, nil
}

func refString(r *bundlev1.BundleRef) string {
	if r == nil {
		return "(none)"
	}
	return fmt.Sprintf("%s serial %d sha256 %s", r.GetRegion(), r.GetSerial(), hex.EncodeToString(r.GetSha256()))
}

// readSignedBundle reads a SignedBundle file written by bundle build.
func readSignedBundle(path string) (*bundlev1.SignedBundle, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	const limit = bundle.MaxSize + 64<<10 // the bundle plus signature and framing
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(data) > limit {
		return nil, fmt.Errorf("%s: larger than a bundle can be", path)
	}
	var sb bundlev1.SignedBundle
	if err := proto.Unmarshal(data, &sb); err != nil {
		return nil, fmt.Errorf("%s is not a signed bundle: %w", path, err)
	}
	return &sb, nil
}

func bundleInspect(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("bundle inspect", stderr)
	o := &options{}
	o.register(fs, withSigningPub)
	var path string
	fs.StringVar(&path, "bundle", "", "signed bundle file (required)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := o.load(); err != nil {
		return err
	}
	if path == "" || len(o.signingPubs()) == 0 {
		return usageError(fs, "--bundle and --signing-pub (or signing_pubs in the config file) are required")
	}
	var pinned []ed25519.PublicKey
	for _, p := range o.signingPubs() {
		pub, err := bundle.ReadPublicKey(p)
		if err != nil {
			return err
		}
		pinned = append(pinned, pub)
	}
	sb, err := readSignedBundle(path)
	if err != nil {
		return err
	}
	b, err := bundle.Verify(sb, pinned)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "bundle %s\n", refString(bundle.Ref(sb, b)))
	fmt.Fprintf(stdout, "signature: valid, key %s\n", sb.GetSigningKeyId())
	fmt.Fprintf(stdout, "format version %d, created %s by %s, %d bytes\n", b.GetFormatVersion(), b.GetCreatedAt().AsTime().UTC().Format(time.RFC3339), b.GetCreatedBy(), len(sb.GetBundle()))
	if b.GetParent() != nil {
		fmt.Fprintf(stdout, "parent: %s\n", refString(b.GetParent()))
	}
	fmt.Fprintf(stdout, "region key versions: %v\n", b.GetRegionKeyVersions())
	fmt.Fprintf(stdout, "keysets: %d\n", len(b.GetKeysets()))
	for _, k := range b.GetKeysets() {
		ek := k.GetKeyset()
		var versions []string
		for _, v := range ek.GetVersions() {
			versions = append(versions, fmt.Sprintf("%d %s", v.GetKeyId(), strings.TrimPrefix(v.GetStatus().String(), "KEY_STATUS_")))
		}
		fmt.Fprintf(stdout, "  %s  team %s, %s, regions %s\n", k.GetName(), k.GetOwnerTeam(), strings.ToLower(strings.TrimPrefix(k.GetPurpose().String(), "PURPOSE_")), strings.Join(k.GetRegions(), ","))
		fmt.Fprintf(stdout, "    region key version %d, primary key %d, keys [%s]\n", ek.GetRegionKeyVersion(), ek.GetPrimaryKeyId(), strings.Join(versions, ", "))
		fmt.Fprintf(stdout, "    rotation period %s, ciphertext TTL %s, propagation window %s\n", k.GetRotationPeriod().AsDuration(), k.GetCiphertextTtl().AsDuration(), k.GetPropagationWindow().AsDuration())
		for _, l := range k.GetLifecycle() {
			fmt.Fprintf(stdout, "    key %d: propagated everywhere %s, primary since %s, superseded %s\n", l.GetKeyId(), ts(l.GetPropagatedEverywhere()), ts(l.GetPrimarySince()), ts(l.GetSupersededAt()))
		}
		acl := k.GetAcl()
		for _, op := range []struct {
			name     string
			patterns []string
		}{{"encrypt", acl.GetEncrypt()}, {"decrypt", acl.GetDecrypt()}, {"generate_data_key", acl.GetGenerateDataKey()}, {"rewrap", acl.GetRewrap()}} {
			who := "nobody"
			if len(op.patterns) > 0 {
				who = strings.Join(op.patterns, ", ")
			}
			fmt.Fprintf(stdout, "    %s: %s\n", op.name, who)
		}
	}
	return nil
}

func bundlePush(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("bundle push", stderr)
	o := &options{}
	o.register(fs, withRoot|withKMS|withWindow)
	var (
		path, why     string
		dryRun, force bool
	)
	fs.StringVar(&path, "bundle", "", "signed bundle file (required)")
	fs.BoolVar(&dryRun, "dry-run", false, "run every check and the dry run on each server, apply nothing")
	fs.BoolVar(&force, "force", false, "apply a bundle the shrink guards refuse (needs --reason; audited; never overrides the Safety Condition)")
	fs.StringVar(&why, "reason", "", "why --force is needed (audited)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if path == "" {
		return usageError(fs, "--bundle is required")
	}
	if force != (strings.TrimSpace(why) != "") {
		return usageError(fs, "--force and --reason go together")
	}
	if err := o.load(); err != nil {
		return err
	}
	sb, err := readSignedBundle(path)
	if err != nil {
		return err
	}
	// Decoded only to name the bundle and pick its servers; each KMS
	// verifies the signature before trusting a byte of it.
	var b bundlev1.Bundle
	if err := proto.Unmarshal(sb.GetBundle(), &b); err != nil {
		return fmt.Errorf("%s does not hold a bundle: %w", path, err)
	}
	if err := regionname.ValidName(b.GetRegion()); err != nil {
		return fmt.Errorf("%s: bundle region: %w", path, err)
	}
	regions, err := o.regions(b.GetRegion())
	if err != nil {
		return err
	}
	src, err := o.source()
	if err != nil {
		return err
	}
	// The fleet-wide Safety Condition needs the record: without the root
	// KMS there is no push (each KMS server's own check sees only itself).
	if len(o.rootAddrs()) == 0 {
		return usageError(fs, "bundle push needs the root KMS (--rootkms, or rootkms in the config file) for the fleet-wide Safety Condition check")
	}
	r, err := o.root()
	if err != nil {
		return err
	}
	defer r.Close()
	return pushBundle(ctx, o, src, r, sb, &b, regions[b.GetRegion()], pushOptions{dryRun: dryRun, force: force, reason: why}, stdout, stderr)
}

type pushOptions struct {
	dryRun, force bool
	reason        string
}

// pushBundle pushes all or nothing: the fleet-wide Safety Condition, then a
// dry run on every server; only if every
// server accepts is the bundle applied, server by server.
func pushBundle(ctx context.Context, o *options, src *identity.Source, r *root, sb *bundlev1.SignedBundle, b *bundlev1.Bundle, servers []string, po pushOptions, stdout, stderr io.Writer) error {
	region := b.GetRegion()
	if len(servers) == 0 {
		return fmt.Errorf("no KMS servers for region %s", region)
	}
	creds, err := kmsCreds(src, region)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "pushing bundle %s (signing key %s) to %d server(s), all or nothing\n", refString(bundle.Ref(sb, b)), sb.GetSigningKeyId(), len(servers))
	if err := fleetCheck(ctx, o, src, r, b, servers, stderr); err != nil {
		return err
	}
	// Dry run everywhere first.
	type answer struct {
		resp *kmsv1.ApplyBundleResponse
		err  error
	}
	answers := make([]answer, len(servers))
	var wg sync.WaitGroup
	for i, addr := range servers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			answers[i].resp, answers[i].err = kmsCall(ctx, addr, creds, o.timeout, func(ctx context.Context, c kmsv1.KMSAdminClient) (*kmsv1.ApplyBundleResponse, error) {
				return c.ApplyBundle(ctx, &kmsv1.ApplyBundleRequest{Bundle: sb, Force: po.force, ForceReason: po.reason, DryRun: true})
			})
		}()
	}
	wg.Wait()
	failed := 0
	for i, addr := range servers {
		if err := answers[i].err; err != nil {
			failed++
			printApplyError(stderr, addr, err)
			continue
		}
		fmt.Fprintf(stdout, "%s: dry run ok: would apply %s (serving: %s)\n", addr, refString(answers[i].resp.GetApplied()), refString(answers[i].resp.GetPrevious()))
		for _, w := range answers[i].resp.GetWarnings() {
			fmt.Fprintf(stdout, "%s: warning: %s\n", addr, w)
		}
	}
	if failed > 0 {
		fmt.Fprintf(stderr, "%d of %d server(s) refused or could not be reached in the dry run: nothing was applied anywhere\n", failed, len(servers))
		return errReported
	}
	if po.dryRun {
		fmt.Fprintln(stdout, "dry run: every server would apply it; nothing applied")
		return nil
	}
	for i, addr := range servers {
		resp, err := kmsCall(ctx, addr, creds, o.timeout, func(ctx context.Context, c kmsv1.KMSAdminClient) (*kmsv1.ApplyBundleResponse, error) {
			return c.ApplyBundle(ctx, &kmsv1.ApplyBundleRequest{Bundle: sb, Force: po.force, ForceReason: po.reason})
		})
		if err != nil {
			printApplyError(stderr, addr, err)
			if i > 0 {
				fmt.Fprintf(stderr, "already applied on: %s; not applied on: %s\n", strings.Join(servers[:i], ", "), strings.Join(servers[i:], ", "))
			}
			return fmt.Errorf("stopped at %s after every server passed the dry run", addr)
		}
		fmt.Fprintf(stdout, "%s: applied %s (previous: %s)\n", addr, refString(resp.GetApplied()), refString(resp.GetPrevious()))
		for _, w := range resp.GetWarnings() {
			fmt.Fprintf(stdout, "%s: warning: %s\n", addr, w)
		}
	}
	return nil
}

func printApplyError(w io.Writer, addr string, err error) {
	st := status.Convert(err)
	switch st.Code() {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled:
		fmt.Fprintf(w, "%s: the call failed (%s): %s\n", addr, st.Code(), st.Message())
	default:
		fmt.Fprintf(w, "%s REFUSED the bundle (%s): %s\n", addr, st.Code(), st.Message())
	}
}

// fleetCheck runs the Safety Condition in fleet scope for going from what
// each server of the region serves to b, with the record and every
// configured server's usage. The region's servers are those pushed to plus
// every server the config file lists for it: a push to some of them (a
// canary, or a fresh server that has no usage of its own) is judged on what
// the others used too.
func fleetCheck(ctx context.Context, o *options, src *identity.Source, r *root, b *bundlev1.Bundle, servers []string, stderr io.Writer) error {
	regions := maps.Clone(o.file.Regions)
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
	obs, err := observe(ctx, src, regions, o.timeout)
	if err != nil {
		return err
	}
	// A server pushed to must answer; one only listed in the config file is
	// judged by the Safety Condition (unknown counts as in use).
	down := slices.DeleteFunc(obs.unreachable(b.GetRegion()), func(s serverObs) bool { return !slices.Contains(servers, s.Addr) })
	if len(down) > 0 {
		for _, s := range down {
			fmt.Fprintf(stderr, "%s: unreachable: %v\n", s.Addr, s.Err)
		}
		fmt.Fprintf(stderr, "%d server(s) of %s unreachable: nothing was applied anywhere\n", len(down), b.GetRegion())
		return errReported
	}
	records, err := r.listKeysets(ctx, "", false)
	if err != nil {
		return fmt.Errorf("reading the record for the safety check: %w", err)
	}
	record := map[string]safety.Keyset{}
	for _, rec := range records {
		record[rec.GetName()] = lifecycle.Keyset(rec)
	}
	next := bundleContent(b)
	fleet := obs.fleet()
	p := safety.Params{Window: o.propagationWindow()}
	now := clockNow(ctx)
	seen := map[string]bool{}
	var refusals []string
	for _, s := range obs.Regions[b.GetRegion()] {
		err := safety.CheckBundle(b.GetRegion(), servedContent(s.Status), next, record, fleet, safety.ScopeFleet, p, now)
		if err == nil {
			continue
		}
		var rs safety.Refusals
		if !errors.As(err, &rs) {
			return fmt.Errorf("safety check: %w", err)
		}
		for _, ref := range rs {
			if msg := ref.Error(); !seen[msg] {
				seen[msg] = true
				refusals = append(refusals, msg)
			}
		}
	}
	if len(refusals) > 0 {
		for _, m := range refusals {
			fmt.Fprintf(stderr, "REFUSED (Safety Condition, fleet-wide): %s\n", m)
		}
		fmt.Fprintln(stderr, "nothing was applied anywhere")
		return errReported
	}
	return nil
}

// bundleContent is what b makes a server serve.
func bundleContent(b *bundlev1.Bundle) safety.Content {
	c := safety.Content{}
	for _, k := range b.GetKeysets() {
		vs := map[uint32]safety.Serving{}
		ek := k.GetKeyset()
		for _, v := range ek.GetVersions() {
			primary := v.GetStatus() == cryptov1.KeyStatus_KEY_STATUS_PRIMARY || v.GetKeyId() == ek.GetPrimaryKeyId()
			vs[v.GetKeyId()] = safety.Serving{Decrypts: primary || decrypts(v.GetStatus()), Primary: primary}
		}
		c[k.GetName()] = vs
	}
	return c
}
