package cli

import (
	"context"
	"crypto/ed25519"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/atomicfile"
	"github.com/cairnkms/cairn/internal/identity"
	regionname "github.com/cairnkms/cairn/internal/region"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	"github.com/cairnkms/cairn/regionctl/bundle"
	"github.com/cairnkms/cairn/regionctl/compile"
	"github.com/cairnkms/cairn/regionctl/config"
	"github.com/cairnkms/cairn/regionctl/store"
)

func bundleBuild(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("bundle build", stderr)
	var (
		id                                   identity.Flags
		region, teams, dir, keyPath, out, by string
		serial                               uint64
	)
	id.Register(fs)
	fs.StringVar(&region, "region", "", "the bundle's region (required)")
	fs.Uint64Var(&serial, "serial", 0, "the bundle's serial, above the one the region serves (required)")
	fs.StringVar(&teams, "teams", "", "directory of team config files (*.json) (required)")
	fs.StringVar(&dir, "store", "", "keyset store directory (required)")
	fs.StringVar(&keyPath, "signing-key", "", "bundle-signing private key file (required)")
	fs.StringVar(&out, "out", "", "where to write the signed bundle (required)")
	fs.StringVar(&by, "created-by", "", "SPIFFE ID recorded as the bundle's author; relative ACL patterns resolve in its trust domain (default: the identity flags' ID)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if region == "" || serial == 0 || teams == "" || dir == "" || keyPath == "" || out == "" {
		return usageError(fs, "--region, --serial (1 or more), --teams, --store, --signing-key and --out are required")
	}
	if err := regionname.ValidName(region); err != nil {
		return usageError(fs, "--region: %v", err)
	}
	if by == "" {
		src, err := source(&id)
		if err != nil {
			return fmt.Errorf("no --created-by, and the identity flags name no usable identity: %w", err)
		}
		by = src.ID().String()
	}
	author, err := identity.Parse(by)
	if err != nil {
		return usageError(fs, "--created-by: %v", err)
	}
	key, err := bundle.ReadPrivateKey(keyPath)
	if err != nil {
		return err
	}
	defer clear(key)
	good, bad, err := config.LoadDir(teams, author.TrustDomain())
	if err != nil {
		return err
	}
	reportBadTeams(stderr, bad, "their keysets are NOT in this bundle")
	st, err := store.Open(dir)
	if err != nil {
		return err
	}
	res, err := compile.Compile(compile.Input{Region: region, Serial: serial, CreatedBy: author.String(), CreatedAt: time.Now(), Teams: good, Store: st})
	if err != nil {
		return err
	}
	if len(res.Missing) > 0 {
		fmt.Fprintf(stderr, "WARNING: %d keyset(s) configured for %s are NOT in this bundle:\n", len(res.Missing), region)
		for _, m := range res.Missing {
			fmt.Fprintf(stderr, "  %s (team %s): %s\n", m.Keyset, m.Team, m.Reason)
		}
	}
	for _, w := range res.Warnings {
		fmt.Fprintf(stderr, "warning: %s\n", w)
	}
	sb, err := bundle.Sign(res.Bundle, key)
	if err != nil {
		return err
	}
	data, err := proto.Marshal(sb)
	if err != nil {
		return fmt.Errorf("encoding the signed bundle: %w", err)
	}
	if err := atomicfile.Write(out, data, 0o600); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "bundle %s, %d keyset(s), region key versions %v, signed by key %s\nwritten to %s\n",
		refString(bundle.Ref(sb, res.Bundle)), len(res.Bundle.GetKeysets()), res.Bundle.GetRegionKeyVersions(), sb.GetSigningKeyId(), out)
	return nil
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
	var path, pubs string
	fs.StringVar(&path, "bundle", "", "signed bundle file (required)")
	fs.StringVar(&pubs, "signing-pub", "", "comma-separated bundle-signing public key files to verify against (required)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if path == "" || len(identity.SplitList(pubs)) == 0 {
		return usageError(fs, "--bundle and --signing-pub are required")
	}
	var pinned []ed25519.PublicKey
	for _, p := range identity.SplitList(pubs) {
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
		fmt.Fprintf(stdout, "    rotation period %s, ciphertext TTL %s\n", k.GetRotationPeriod().AsDuration(), k.GetCiphertextTtl().AsDuration())
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
	var (
		id               identity.Flags
		addrs, path, why string
		dryRun, force    bool
		timeout          time.Duration
	)
	id.Register(fs)
	fs.StringVar(&addrs, "kms", "", "comma-separated KMS server addresses (host:port), applied in this order (required)")
	fs.StringVar(&path, "bundle", "", "signed bundle file (required)")
	fs.BoolVar(&dryRun, "dry-run", false, "run every check and the build on each server, then discard the result")
	fs.BoolVar(&force, "force", false, "apply a bundle the shrink guards refuse (needs --reason; audited)")
	fs.StringVar(&why, "reason", "", "why --force is needed (audited)")
	fs.DurationVar(&timeout, "timeout", DefaultTimeout, "deadline of each ApplyBundle call")
	if err := parse(fs, args); err != nil {
		return err
	}
	servers := identity.SplitList(addrs)
	if len(servers) == 0 || path == "" {
		return usageError(fs, "--kms and --bundle are required")
	}
	if force != (strings.TrimSpace(why) != "") {
		return usageError(fs, "--force and --reason go together")
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
	src, err := source(&id)
	if err != nil {
		return err
	}
	// Only KMS servers of the bundle's region may receive it.
	kmsOfRegion, err := identity.ParseAllowlist(src.TrustDomain(), "kms/"+b.GetRegion()+"/*")
	if err != nil {
		return err
	}
	creds := identity.ClientCredentials(src, kmsOfRegion.Authorize)
	mode := "applying"
	if dryRun {
		mode = "dry run of"
	}
	fmt.Fprintf(stdout, "%s bundle %s (signing key %s) on %d server(s)\n", mode, refString(bundle.Ref(sb, &b)), sb.GetSigningKeyId(), len(servers))
	for i, addr := range servers {
		resp, err := applyOne(ctx, addr, creds, timeout, &kmsv1.ApplyBundleRequest{Bundle: sb, Force: force, ForceReason: why, DryRun: dryRun})
		if err != nil {
			st := status.Convert(err)
			switch st.Code() {
			case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled:
				fmt.Fprintf(stderr, "%s: the call failed (%s): %s\n", addr, st.Code(), st.Message())
			default:
				fmt.Fprintf(stderr, "%s REFUSED the bundle (%s): %s\n", addr, st.Code(), st.Message())
			}
			if i > 0 && !dryRun {
				fmt.Fprintf(stderr, "already applied on: %s; not pushed to: %s\n", strings.Join(servers[:i], ", "), strings.Join(servers[i+1:], ", "))
			}
			return fmt.Errorf("stopped at %s", addr)
		}
		verb := "applied"
		if dryRun {
			verb = "would apply"
		}
		fmt.Fprintf(stdout, "%s: %s %s (previous: %s)\n", addr, verb, refString(resp.GetApplied()), refString(resp.GetPrevious()))
		for _, w := range resp.GetWarnings() {
			fmt.Fprintf(stdout, "%s: warning: %s\n", addr, w)
		}
	}
	return nil
}

func applyOne(ctx context.Context, addr string, creds *identity.Credentials, timeout time.Duration, req *kmsv1.ApplyBundleRequest) (*kmsv1.ApplyBundleResponse, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	return kmsv1.NewKMSAdminClient(conn).ApplyBundle(ctx, req)
}
