package cli

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
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
	"unicode"

	"google.golang.org/grpc"
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
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/regionctl/compile"
	"github.com/cairnkms/cairn/regionctl/config"
	"github.com/cairnkms/cairn/regionctl/rollout"
)

func bundleBuild(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("bundle build", stderr)
	o := &options{}
	o.register(fs, withRoot|withKMS|withTeams|withSigningKey|withWindow)
	var (
		region, out, by, why      string
		serial                    uint64
		allowPartial, forceShrink bool
		validFor                  time.Duration
	)
	fs.StringVar(&region, "region", "", "the bundle's region (required)")
	fs.Uint64Var(&serial, "serial", 0, "the bundle's serial (default: one above the highest serial any server of the region serves)")
	fs.StringVar(&out, "out", "", "where to write the signed bundle (required)")
	fs.DurationVar(&validFor, "valid-for", bundle.DefaultValidity, fmt.Sprintf("how long after it is built the bundle may be applied (its signed not_after; at most %v). "+
		"A KMS server refuses to apply an expired bundle but keeps serving one it applied", bundle.MaxValidity))
	// --created-by is kept only to say why it is refused.
	fs.StringVar(&by, "created-by", "", "gone: a bundle's author is regionctl's own SPIFFE identity (the one it uses for mTLS)")
	fs.BoolVar(&allowPartial, "allow-partial", false, "leave out the keysets that cannot be built, recorded with --reason in the signed bundle (audited by every KMS server)")
	fs.BoolVar(&forceShrink, "force-shrink", false, "let the bundle shrink past the shrink guard: the override and --reason are signed into it and audited by every KMS server; never overrides the Safety Condition")
	fs.StringVar(&why, "reason", "", "why --allow-partial or --force-shrink (a ticket, an incident); signed into the bundle")
	if err := parse(fs, args); err != nil {
		return err
	}
	if region == "" || out == "" {
		return usageError(fs, "--region and --out are required")
	}
	if (allowPartial || forceShrink) != (strings.TrimSpace(why) != "") {
		return usageError(fs, "--reason goes with --allow-partial or --force-shrink, and they need it")
	}
	if err := checkReasonFlag(why); err != nil {
		return usageError(fs, "--reason: %v", err)
	}
	if err := regionname.ValidName(region); err != nil {
		return usageError(fs, "--region: %v", err)
	}
	if by != "" {
		return usageError(fs, "--created-by is gone: a bundle's created_by (and a shrink override's forced_by, a partial build's built_by) "+
			"is regionctl's own SPIFFE identity, the one it authenticates with (--name or the config file), so a bundle's provenance cannot be typed in")
	}
	if validFor <= 0 || validFor > bundle.MaxValidity {
		return usageError(fs, "--valid-for %v: must be positive and at most %v", validFor, bundle.MaxValidity)
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
	_, err = buildBundle(ctx, o, r, buildRequest{region: region, serial: serial, out: out, validFor: validFor,
		allowPartial: allowPartial, forceShrink: forceShrink, reason: why}, stdout, stderr)
	return err
}

// checkReasonFlag checks a --reason the way the bundle format does, so a bad
// one is a usage error rather than a signing failure.
func checkReasonFlag(why string) error {
	switch {
	case len(why) > bundle.MaxReasonLen:
		return fmt.Errorf("%d bytes, more than %d", len(why), bundle.MaxReasonLen)
	case strings.ContainsFunc(why, unicode.IsControl):
		return errors.New("contains a control character")
	}
	return nil
}

type buildRequest struct {
	region, out string
	serial      uint64
	// validFor is how long the bundle may be applied after it is built (0:
	// bundle.DefaultValidity).
	validFor time.Duration
	// obs, if set, is a fresh observation of the region's servers (for the
	// serial, the parent and the shrink guard).
	obs *observation
	// allowPartial leaves out the keysets that cannot be built; forceShrink
	// signs a shrink override into the bundle. Both record reason.
	allowPartial, forceShrink bool
	reason                    string
}

// buildBundle compiles, signs and writes one region's bundle, or refuses
// (printing every problem, writing nothing). Its author (created_by, and
// forced_by or built_by of an override) is regionctl's own identity, the
// one it authenticates to the root KMS and the KMS servers with: never
// typed in.
func buildBundle(ctx context.Context, o *options, r *root, req buildRequest, stdout, stderr io.Writer) (*bundlev1.SignedBundle, error) {
	author := r.src.ID()
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
		msg := fmt.Sprintf("team file %s: %s", e.File, strings.ReplaceAll(e.Err.Error(), "\n", "\n    "))
		if req.allowPartial {
			// Its keysets the record serves are left out (and recorded) as
			// keysets no valid team file lists.
			fmt.Fprintf(stderr, "PARTIAL: %s\n", msg)
			continue
		}
		problems = append(problems, msg)
	}
	records, err := r.listKeysets(ctx, req.region, true)
	if status.Code(err) == codes.NotFound {
		problems = append(problems, fmt.Sprintf("region %s is unknown to the root KMS (%s)", req.region, status.Convert(err).Message()))
	} else if err != nil {
		return nil, fmt.Errorf("reading the record: %w", err)
	}
	// The region's servers, if known: for the serial, the parent and the
	// shrink guard.
	serial, parent, obs := req.serial, (*bundlev1.BundleRef)(nil), req.obs
	if obs == nil {
		regions, rerr := o.regions(req.region)
		switch {
		case rerr == nil:
			if obs, err = observe(ctx, r.src, regions, o.timeout); err != nil {
				return nil, err
			}
		case serial == 0:
			return nil, fmt.Errorf("no --serial, and the region's servers are unknown to ask for theirs: %w", rerr)
		}
	}
	if obs != nil {
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
		in := compile.Input{Region: req.region, Serial: serial, CreatedBy: author.String(), CreatedAt: clockNow(ctx), ValidFor: req.validFor,
			Parent: parent, Teams: good, Record: records, Window: o.propagationWindow(), EncryptLimit: o.file.encryptLimit()}
		in.Quotas, in.DefaultQuota = o.file.quotas()
		if req.allowPartial {
			in.AllowPartial, in.PartialReason = true, req.reason
		}
		res, err := compile.Compile(in)
		if err != nil {
			return nil, err
		}
		for _, p := range res.Problems {
			problems = append(problems, p.String())
		}
		if len(problems) == 0 {
			if err := guardShrink(ctx, r.src, o.timeout, obs, res.Bundle, author, req, stdout, stderr); err != nil {
				return nil, err
			}
			if p := res.Bundle.GetPartial(); p != nil {
				fmt.Fprintf(stderr, "PARTIAL: the %s bundle leaves out %d keyset(s), recorded with the reason %q (every KMS server audits it):\n", req.region, len(p.GetLeftOut()), p.GetReason())
				for _, l := range p.GetLeftOut() {
					fmt.Fprintf(stderr, "  %s\n", l)
				}
			} else if req.allowPartial {
				fmt.Fprintln(stdout, "--allow-partial: nothing left out; the bundle is whole and records no partial build")
			}
			return writeBundle(res.Bundle, key, req.out, stdout)
		}
	}
	what := "cannot hold every keyset"
	if req.allowPartial {
		what = "cannot be built, even partially"
	}
	fmt.Fprintf(stderr, "REFUSED: the %s bundle %s; no bundle written. %d problem(s):\n", req.region, what, len(problems))
	for _, p := range problems {
		fmt.Fprintf(stderr, "  %s\n", p)
	}
	if !req.allowPartial {
		fmt.Fprintln(stderr, "(to leave the keysets with problems out, on purpose: --allow-partial --reason TEXT)")
	}
	return nil, errReported
}

// guardShrink runs the shrink guard of next against every bundle the
// region's servers serve (obs; nil if the servers are unknown) and refuses,
// printing the reports, unless req.forceShrink, which signs a shrink
// override into next. What it cannot see (a server down, the servers
// unknown) it says it did not check: every KMS server checks again against
// what it serves when the bundle is pushed.
func guardShrink(ctx context.Context, src *identity.Source, timeout time.Duration, obs *observation, next *bundlev1.Bundle, author identity.ID,
	req buildRequest, stdout, stderr io.Writer) error {
	if req.forceShrink {
		next.ShrinkOverride = &bundlev1.ShrinkOverride{Reason: req.reason, ForcedBy: author.String()}
	}
	raw, err := bundle.Marshal(next)
	if err != nil {
		return fmt.Errorf("encoding the bundle: %w", err)
	}
	if obs == nil {
		fmt.Fprintf(stderr, "shrink guard: no KMS servers known for %s, so not checked here; every KMS server checks it when it is pushed\n", req.region)
		return nil
	}
	served := fetchServed(ctx, src, timeout, obs, req.region)
	refused, exceeded := printShrink(stdout, served, obs.unreachable(req.region), next, len(raw))
	switch {
	case refused:
		fmt.Fprintf(stderr, "REFUSED: the %s bundle shrinks past the shrink guard against what the region serves (above); no bundle written.\n", req.region)
		fmt.Fprintln(stderr, "If that is meant: --force-shrink --reason TEXT (the override is signed into the bundle and audited by every KMS server; the Safety Condition still applies)")
		return errReported
	case req.forceShrink && !exceeded:
		fmt.Fprintln(stdout, "--force-shrink: not needed against what the region's servers serve; the override is recorded anyway")
	}
	return nil
}

// servedBundle is one bundle a region's servers serve, and who serves it.
type servedBundle struct {
	ref     *bundlev1.BundleRef
	servers []string
	bundle  *bundlev1.Bundle // nil if it could not be read (err)
	size    int
	err     error
}

// fetchServed reads each distinct bundle the region's servers serve (by
// obs), lowest serial first, from the first of its servers that returns it.
func fetchServed(ctx context.Context, src *identity.Source, timeout time.Duration, obs *observation, region string) []servedBundle {
	var out []servedBundle
	for _, s := range obs.Regions[region] {
		ref := s.Status.GetBundle()
		if s.Err != nil || ref == nil {
			continue
		}
		i := slices.IndexFunc(out, func(b servedBundle) bool { return proto.Equal(b.ref, ref) })
		if i < 0 {
			out = append(out, servedBundle{ref: ref})
			i = len(out) - 1
		}
		out[i].servers = append(out[i].servers, s.Addr)
	}
	slices.SortFunc(out, func(a, b servedBundle) int { return cmpSerial(a.ref, b.ref) })
	creds, err := kmsCreds(src, region)
	for i := range out {
		sb := &out[i]
		if err != nil {
			sb.err = err
			continue
		}
		var errs []string
		for _, addr := range sb.servers {
			b, size, ferr := fetchBundle(ctx, addr, creds, timeout, sb.ref)
			if ferr == nil {
				sb.bundle, sb.size = b, size
				break
			}
			errs = append(errs, fmt.Sprintf("%s: %v", addr, ferr))
		}
		if sb.bundle == nil {
			sb.err = errors.New(strings.Join(errs, "; "))
		}
	}
	return out
}

func cmpSerial(a, b *bundlev1.BundleRef) int {
	switch {
	case a.GetSerial() < b.GetSerial():
		return -1
	case a.GetSerial() > b.GetSerial():
		return 1
	}
	return strings.Compare(hex.EncodeToString(a.GetSha256()), hex.EncodeToString(b.GetSha256()))
}

// fetchBundle asks addr for the signed bundle it serves and decodes it; it
// must be ref (the server may have moved on since it was observed).
func fetchBundle(ctx context.Context, addr string, creds *identity.Credentials, timeout time.Duration, ref *bundlev1.BundleRef) (*bundlev1.Bundle, int, error) {
	st, err := kmsCall(ctx, addr, creds, timeout, func(ctx context.Context, c kmsv1.KMSAdminClient) (*kmsv1.GetStatusResponse, error) {
		return c.GetStatus(ctx, &kmsv1.GetStatusRequest{IncludeBundle: true}, grpc.MaxCallRecvMsgSize(bundle.MaxSize+1<<20))
	})
	if err != nil {
		return nil, 0, err
	}
	sb := st.GetServedBundle()
	if sb == nil {
		return nil, 0, errors.New("it returned no served bundle (a KMS server too old to?)")
	}
	sum := sha256.Sum256(sb.GetBundle())
	if !bytes.Equal(sum[:], ref.GetSha256()) {
		return nil, 0, fmt.Errorf("it now serves %s, not %s", refString(st.GetBundle()), refString(ref))
	}
	var b bundlev1.Bundle
	if err := (proto.UnmarshalOptions{DiscardUnknown: true}).Unmarshal(sb.GetBundle(), &b); err != nil {
		return nil, 0, fmt.Errorf("its served bundle does not decode: %w", err)
	}
	return &b, len(sb.GetBundle()), nil
}

// printShrink prints the shrink guard's report of next against each served
// bundle, and what it could not check. refused: some served bundle refuses
// next; exceeded: next is past the guard against some (with or without an
// override).
func printShrink(w io.Writer, served []servedBundle, down []serverObs, next *bundlev1.Bundle, nextSize int) (refused, exceeded bool) {
	if len(served) == 0 && len(down) == 0 {
		fmt.Fprintln(w, "shrink guard: the region's servers serve nothing yet: no shrink to check")
	}
	for _, sb := range served {
		who := strings.Join(sb.servers, ", ")
		if sb.err != nil {
			fmt.Fprintf(w, "shrink guard: %s (served by %s) could not be read, so not checked here: %v; each KMS server checks it when it is pushed\n", refString(sb.ref), who, sb.err)
			continue
		}
		r, err := bundle.CheckShrink(sb.bundle, next, sb.size, nextSize, bundle.ShrinkGuard{})
		if r == nil { // an invalid guard: not with the defaults
			fmt.Fprintf(w, "shrink guard: %v\n", err)
			refused = true
			continue
		}
		refused = refused || err != nil
		exceeded = exceeded || r.Exceeded()
		fmt.Fprintf(w, "shrink guard (served by %s): %s\n", who, r)
	}
	for _, s := range down {
		fmt.Fprintf(w, "shrink guard: %s did not answer, so not checked here; it checks the bundle itself when it is pushed\n", s.Addr)
	}
	return refused, exceeded
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

func bundleInspect(ctx context.Context, args []string, stdout, stderr io.Writer) error {
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
	if na, ok := bundle.NotAfter(b); ok {
		state := "applicable"
		if bundle.Expired(b, clockNow(ctx)) {
			state = "EXPIRED: no KMS server applies it any more (one that applied it keeps serving it)"
		}
		fmt.Fprintf(stdout, "not after %s (%s)\n", na.UTC().Format(time.RFC3339), state)
	} else {
		fmt.Fprintln(stdout, "not after: none (format version 1)")
	}
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
		if d := k.GetDestroyedKeyIds(); len(d) > 0 {
			fmt.Fprintf(stdout, "    destroyed through the lifecycle (may leave a server that still holds them): %v\n", d)
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
	// --force and --reason are kept only to say where they went.
	fs.BoolVar(&force, "force", false, "gone: a shrink override is signed into the bundle (bundle build --force-shrink --reason)")
	fs.StringVar(&why, "reason", "", "gone, with --force")
	if err := parse(fs, args); err != nil {
		return err
	}
	if path == "" {
		return usageError(fs, "--bundle is required")
	}
	if force || why != "" {
		return usageError(fs, "--force and --reason are gone from bundle push: a shrink override is signed into the bundle, "+
			"so every KMS server sees and audits the same one: regionctl bundle build --force-shrink --reason TEXT, then push that bundle "+
			"(the Safety Condition is never forceable)")
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
	return pushBundle(ctx, o, src, r, sb, &b, regions[b.GetRegion()], pushOptions{dryRun: dryRun}, stdout, stderr)
}

type pushOptions struct {
	dryRun bool
}

// pushBundle pushes all or nothing: the fleet-wide Safety Condition, then a
// dry run on every server; only if every
// server accepts is the bundle applied, server by server. A region with a
// rollout in flight is refused before anything is asked of its servers.
func pushBundle(ctx context.Context, o *options, src *identity.Source, r *root, sb *bundlev1.SignedBundle, b *bundlev1.Bundle, servers []string, po pushOptions, stdout, stderr io.Writer) error {
	region := b.GetRegion()
	if len(servers) == 0 {
		return fmt.Errorf("no KMS servers for region %s", region)
	}
	// A push changes every server of the region at once: under a rollout in
	// flight it would skip that rollout's stages, be judged by its gates,
	// and collide on serial with its rollback. So it is refused as a second
	// rollout for the region is.
	if err := checkRegionsFree(ctx, rolloutsOf(ctx, r), rollout.Plan{Regions: []string{region}}); err != nil {
		var busy *rollout.ConflictError
		if !errors.As(err, &busy) {
			return err
		}
		id := busy.Busy[region]
		return fmt.Errorf("refused: region %s has rollout %s in flight, and a push would change every server of the region under it; "+
			"let it finish (regionctl rollout resume %s) or stop it (regionctl rollout rollback %s --reason TEXT, or rollout abort %s --reason TEXT), then push again",
			region, id, id, id, id)
	}
	creds, err := kmsCreds(src, region)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "pushing bundle %s (signing key %s) to %d server(s), all or nothing\n", refString(bundle.Ref(sb, b)), sb.GetSigningKeyId(), len(servers))
	obs, err := fleetCheck(ctx, o, src, r, b, servers, stderr)
	if err != nil {
		return err
	}
	// The shrink guard, for information: each server decides against what
	// it serves (in the dry run below), and the bundle's signed override,
	// if any, is the only way past it.
	pushed := &observation{At: obs.At, Regions: map[string][]serverObs{region: slices.DeleteFunc(slices.Clone(obs.Regions[region]),
		func(s serverObs) bool { return !slices.Contains(servers, s.Addr) })}}
	printShrink(stdout, fetchServed(ctx, src, o.timeout, pushed, region), nil, b, len(sb.GetBundle()))
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
				return c.ApplyBundle(ctx, &kmsv1.ApplyBundleRequest{Bundle: sb, DryRun: true})
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
			return c.ApplyBundle(ctx, &kmsv1.ApplyBundleRequest{Bundle: sb})
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
	if err := r.recordSerial(ctx, region, b.GetSerial()); err != nil {
		fmt.Fprintf(stderr, "the bundle is applied on every server, but %v; push it again to record it "+
			"(until then a KMS server with a fresh state directory would accept an older bundle)\n", err)
		return errReported
	}
	fmt.Fprintf(stdout, "recorded serial %d as delivered to %s: no KMS server of it accepts an older bundle\n", b.GetSerial(), region)
	return nil
}

// recordSerial records in the root KMS that a bundle of serial was delivered
// to region's servers: the region's bundle serial floor, which a KMS server
// with a fresh state directory learns before it applies a bundle, so an old
// signed bundle cannot be replayed onto it. The floor only rises.
func (r *root) recordSerial(ctx context.Context, region string, serial uint64) error {
	err := r.do(ctx, func(ctx context.Context, c rootkmsv1.RootKMSClient) error {
		_, err := c.RecordBundleSerial(ctx, &rootkmsv1.RecordBundleSerialRequest{Region: region, Serial: serial})
		return err
	})
	if err != nil {
		return fmt.Errorf("recording serial %d as delivered to %s in the root KMS failed: %w", serial, region, err)
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
//
// It returns the observation it made.
func fleetCheck(ctx context.Context, o *options, src *identity.Source, r *root, b *bundlev1.Bundle, servers []string, stderr io.Writer) (*observation, error) {
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
		return nil, err
	}
	// A server pushed to must answer; one only listed in the config file is
	// judged by the Safety Condition (unknown counts as in use).
	down := slices.DeleteFunc(obs.unreachable(b.GetRegion()), func(s serverObs) bool { return !slices.Contains(servers, s.Addr) })
	if len(down) > 0 {
		for _, s := range down {
			fmt.Fprintf(stderr, "%s: unreachable: %v\n", s.Addr, s.Err)
		}
		fmt.Fprintf(stderr, "%d server(s) of %s unreachable: nothing was applied anywhere\n", len(down), b.GetRegion())
		return nil, errReported
	}
	records, err := r.listKeysets(ctx, "", false)
	if err != nil {
		return nil, fmt.Errorf("reading the record for the safety check: %w", err)
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
			return nil, fmt.Errorf("safety check: %w", err)
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
		return nil, errReported
	}
	return obs, nil
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
