package cli_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
)

// servingEnv is an env whose us-east KMS server (a fake) serves the bundle
// built from the full team files (serial 1: payments/ledger, payments/new,
// search/index).
func servingEnv(t *testing.T) (*env, string) {
	t.Helper()
	pki := identitytest.New(t, identitytest.TrustDomain)
	f := &fakeKMS{}
	addr := startFakeKMS(t, pki, f, 1)
	e := newEnvWithPKI(t, pki, map[string][]string{"us-east": {addr}})
	full := filepath.Join(e.dir, "full.bundle")
	r := mustRun(t, "bundle", "build", "--config", e.config, "--region", "us-east", "--out", full)
	contains(t, "first bundle build stdout", r.stdout, "shrink guard: the region's servers serve nothing yet")
	sb := readBundle(t, full)
	b := e.verify(t, full)
	f.mu.Lock()
	f.served, f.signed = bundle.Ref(sb, b), sb
	f.mu.Unlock()
	return e, addr
}

func requireNoFile(t *testing.T, path string) {
	t.Helper()
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("bundle build refused but %s exists (%v)", path, err)
	}
}

// TestBuildShrinkGuard: against the bundle the region serves, a build that
// drops two of three keysets (a partial build after a team file went
// missing) or every ACL entry (team files with their ACLs cut off) is
// refused with the report, and is built with --force-shrink, which signs the
// override and its reason into the bundle.
func TestBuildShrinkGuard(t *testing.T) {
	const reason = "INC-2014: payments moves out of us-east"
	e, addr := servingEnv(t)
	os.Remove(filepath.Join(e.teams, "payments.json"))
	out := filepath.Join(e.dir, "next.bundle")
	build := func(flags ...string) result {
		return run(t, append([]string{"bundle", "build", "--config", e.config, "--region", "us-east", "--out", out}, flags...)...)
	}

	r := build()
	if r.code != 1 {
		t.Fatalf("bundle build without payments.json = %d, want 1\nstderr:\n%s", r.code, r.stderr)
	}
	contains(t, "bundle build stderr", r.stderr, "REFUSED: the us-east bundle cannot hold every keyset", "(to leave the keysets with problems out, on purpose: --allow-partial --reason TEXT)")
	requireNoFile(t, out)

	r = build("--allow-partial", "--reason", reason)
	if r.code != 1 {
		t.Fatalf("bundle build --allow-partial past the shrink guard = %d, want 1\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
	contains(t, "bundle build stdout", r.stdout, "shrink guard (served by "+addr+"): against serial 1: drops 2 of 3 keysets",
		"REFUSED: drops 2 of 3 keysets (67%, more than 10% and more than 1): payments/ledger, payments/new")
	contains(t, "bundle build stderr", r.stderr, "REFUSED: the us-east bundle shrinks past the shrink guard against what the region serves (above); no bundle written.",
		"If that is meant: --force-shrink --reason TEXT")
	requireNoFile(t, out)

	r = build("--allow-partial", "--force-shrink", "--reason", reason)
	if r.code != 0 {
		t.Fatalf("bundle build --allow-partial --force-shrink = %d, want 0\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
	contains(t, "bundle build stdout", r.stdout, "allowed by override: "+reason+" (forced by "+regionctlID+")", "serial 2 ")
	contains(t, "bundle build stderr", r.stderr, "PARTIAL: the us-east bundle leaves out 2 keyset(s)")
	b := e.verify(t, out)
	if got, want := keysetNames(b), []string{"search/index"}; !cmp.Equal(got, want) {
		t.Errorf("bundle keysets = %v, want %v", got, want)
	}
	if o := b.GetShrinkOverride(); o.GetReason() != reason || o.GetForcedBy() != regionctlID {
		t.Errorf("shrink_override = %v, want reason %q forced by %s", o, reason, regionctlID)
	}
	p := b.GetPartial()
	if p.GetReason() != reason || p.GetBuiltBy() != regionctlID || len(p.GetLeftOut()) != 2 ||
		!strings.HasPrefix(p.GetLeftOut()[0], "payments/ledger: the record serves it in us-east, but no valid team file lists it") ||
		!strings.HasPrefix(p.GetLeftOut()[1], "payments/new: the record serves it in us-east, but no valid team file lists it") {
		t.Errorf("partial = %v, want reason %q, built by %s, payments/ledger and payments/new left out with why", p, reason, regionctlID)
	}

	// Every ACL entry of the keysets kept is gone: never all of them.
	strip := func(team, acl string) string {
		if !strings.Contains(team, acl) {
			t.Fatalf("team file has no %q", acl)
		}
		return strings.Replace(team, acl, "", 1)
	}
	writeFile(t, filepath.Join(e.teams, "payments.json"), strip(paymentsTeam, `,
   "acl":{"encrypt":["client/us-east/*"],"decrypt":["client/*/ledger"],"generate_data_key":[],"rewrap":[]}`))
	writeFile(t, filepath.Join(e.teams, "search.json"), strip(searchTeam, `,
   "acl":{"decrypt":["spiffe://cairn.test/client/us-east/indexer"],"rewrap":["regionctl/global/*"]}`))
	os.Remove(out)
	r = build()
	if r.code != 1 {
		t.Fatalf("bundle build with the ACLs cut off = %d, want 1\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
	contains(t, "bundle build stdout", r.stdout, "REFUSED: drops 4 of 4 ACL entries of the keysets it keeps (100%: never all of them): payments/ledger decrypt client/*/ledger")
	requireNoFile(t, out)
}

// TestBuildAllowPartial: --allow-partial leaves out what cannot be built
// and records it; an invalid team file is reported, not fatal.
func TestBuildAllowPartial(t *testing.T) {
	e := newEnv(t, nil)
	writeFile(t, filepath.Join(e.teams, "maps.json"), `{"team":"maps","keysets":[{"name":"maps/tiles","regions":["us-east"],"purpose":"envelope","rotation_period":"1h","ciphertext_ttl":"1h"}]}`)
	writeFile(t, filepath.Join(e.teams, "ads.json"), brokenTeam)
	out := filepath.Join(e.dir, "partial.bundle")
	const reason = "INC-9: maps/tiles is created tomorrow"
	r := mustRun(t, "bundle", "build", "--config", e.config, "--region", "us-east", "--serial", "2", "--out", out, "--allow-partial", "--reason", reason)
	contains(t, "bundle build stderr", r.stderr, "PARTIAL: team file", "ads.json",
		"PARTIAL: the us-east bundle leaves out 1 keyset(s)", "maps/tiles: (team maps) not in the root KMS record for us-east",
		"shrink guard: no KMS servers known for us-east, so not checked here")
	b := e.verify(t, out)
	if got, want := keysetNames(b), []string{"payments/ledger", "payments/new", "search/index"}; !cmp.Equal(got, want) {
		t.Errorf("bundle keysets = %v, want %v", got, want)
	}
	want := &bundlev1.PartialBuild{Reason: reason, BuiltBy: regionctlID,
		LeftOut: []string{"maps/tiles: (team maps) not in the root KMS record for us-east (run regionctl keyset create)"}}
	if got := b.GetPartial(); got.GetReason() != want.Reason || got.GetBuiltBy() != want.BuiltBy || !cmp.Equal(got.GetLeftOut(), want.LeftOut) {
		t.Errorf("partial = %v, want %v", got, want)
	}
	if b.GetShrinkOverride() != nil {
		t.Errorf("shrink_override = %v, want none", b.GetShrinkOverride())
	}
}
