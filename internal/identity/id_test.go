package identity

import (
	"errors"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var td = spiffeid.RequireTrustDomainFromString("cairn.test")

func TestParse(t *testing.T) {
	tests := []struct {
		in                 string
		tier, region, name string
		wantErr            bool
	}{
		{in: "spiffe://cairn.test/kms/us-east/kms-1", tier: "kms", region: "us-east", name: "kms-1"},
		{in: "spiffe://cairn.test/officer/global/officer-1", tier: "officer", region: "global", name: "officer-1"},
		{in: "spiffe://cairn.test/client/eu-west/a_b.c", tier: "client", region: "eu-west", name: "a_b.c"},
		{in: "", wantErr: true},
		{in: "kms/us-east/kms-1", wantErr: true},                          // not a URI
		{in: "https://cairn.test/kms/us-east/kms-1", wantErr: true},       // wrong scheme
		{in: "spiffe://cairn.test", wantErr: true},                        // no path
		{in: "spiffe://cairn.test/kms/us-east", wantErr: true},            // two segments
		{in: "spiffe://cairn.test/kms/us-east/kms-1/x", wantErr: true},    // four segments
		{in: "spiffe://cairn.test/kms/us-east/kms-1/", wantErr: true},     // trailing slash
		{in: "spiffe://cairn.test/kms//kms-1", wantErr: true},             // empty segment
		{in: "spiffe://cairn.test/KMS/us-east/kms-1", wantErr: true},      // uppercase
		{in: "spiffe://cairn.test/kms/us-east/*", wantErr: true},          // wildcard is not an ID
		{in: "spiffe://cairn.test/kms/../kms-1", wantErr: true},           // dot segment
		{in: "spiffe://Cairn.test/kms/us-east/kms-1", wantErr: true},      // uppercase trust domain
		{in: "spiffe://cairn.test/kms/us-east/kms-1?x=1", wantErr: true},  // query
		{in: "spiffe://user@cairn.test/kms/us-east/kms-1", wantErr: true}, // userinfo
		{in: "spiffe://cairn.test:8443/kms/us-east/kms-1", wantErr: true}, // port
		{in: "spiffe://cairn.test/kms/us-east/kms%2D1", wantErr: true},    // percent-encoding
		{in: "spiffe://cairn.test/kms/us east/kms-1", wantErr: true},      // space
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			id, err := Parse(tt.in)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("Parse(%q) = %v, want error", tt.in, id)
				}
				if !errors.Is(err, ErrInvalidID) {
					t.Errorf("Parse(%q) error = %v, want it to wrap ErrInvalidID", tt.in, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse(%q) = %v", tt.in, err)
			}
			if id.Tier() != tt.tier || id.Region() != tt.region || id.Name() != tt.name {
				t.Errorf("Parse(%q) = %s/%s/%s, want %s/%s/%s", tt.in, id.Tier(), id.Region(), id.Name(), tt.tier, tt.region, tt.name)
			}
			if id.String() != tt.in {
				t.Errorf("Parse(%q).String() = %q, want the input", tt.in, id.String())
			}
		})
	}
}

func TestNew(t *testing.T) {
	id, err := New(td, TierKMS, "us-east", "kms-1")
	if err != nil {
		t.Fatalf("New = %v", err)
	}
	if got, want := id.String(), "spiffe://cairn.test/kms/us-east/kms-1"; got != want {
		t.Errorf("New().String() = %q, want %q", got, want)
	}
	for _, bad := range [][3]string{{"", "r", "n"}, {"t", "", "n"}, {"t", "r", ""}, {"t/x", "r", "n"}, {"T", "r", "n"}, {"*", "r", "n"}} {
		if _, err := New(td, bad[0], bad[1], bad[2]); err == nil {
			t.Errorf("New(%q) = nil error, want error", bad)
		}
	}
	if _, err := New(spiffeid.TrustDomain{}, "t", "r", "n"); err == nil {
		t.Errorf("New(zero trust domain) = nil error, want error")
	}
}

func TestPatternMatch(t *testing.T) {
	tests := []struct {
		pattern string
		id      string
		want    bool
	}{
		// Exact.
		{"kms/us-east/kms-1", "spiffe://cairn.test/kms/us-east/kms-1", true},
		{"kms/us-east/kms-1", "spiffe://cairn.test/kms/us-east/kms-2", false},
		{"spiffe://cairn.test/kms/us-east/kms-1", "spiffe://cairn.test/kms/us-east/kms-1", true},
		// A wildcard is one whole segment, never a prefix.
		{"kms/us-east/*", "spiffe://cairn.test/kms/us-east/x", true},
		{"kms/us-east/*", "spiffe://cairn.test/kms/us-east-evil/x", false},
		{"kms/us-east/*", "spiffe://cairn.test/kms/us-eas/x", false},
		{"kms/us-east/*", "spiffe://cairn.test/kms/us-east.evil/x", false},
		{"kms/us-east/*", "spiffe://cairn.test/kms-evil/us-east/x", false},
		{"kms/*/kms-1", "spiffe://cairn.test/kms/eu-west/kms-1", true},
		{"kms/*/kms-1", "spiffe://cairn.test/kms/eu-west/kms-10", false},
		{"*/*/*", "spiffe://cairn.test/officer/global/officer-1", true},
		{"kms/us-east/kms-1", "spiffe://cairn.test/kms/us-east/kms-1x", false},
		// Case-sensitive: IDs are lowercase, so is every matching pattern.
		{"kms/us-east/*", "spiffe://cairn.test/kms/us-east/abc", true},
		// Another trust domain never matches, wildcard or not.
		{"kms/us-east/*", "spiffe://evil.test/kms/us-east/x", false},
		{"spiffe://other.test/kms/us-east/*", "spiffe://cairn.test/kms/us-east/x", false},
		{"*/*/*", "spiffe://cairn.test.evil/kms/us-east/x", false},
	}
	for _, tt := range tests {
		t.Run(tt.pattern+" ~ "+tt.id, func(t *testing.T) {
			p, err := ParsePattern(tt.pattern, td)
			if err != nil {
				t.Fatalf("ParsePattern(%q) = %v", tt.pattern, err)
			}
			if got := p.Match(MustParse(tt.id)); got != tt.want {
				t.Errorf("ParsePattern(%q).Match(%s) = %v, want %v", tt.pattern, tt.id, got, tt.want)
			}
		})
	}
	p := MustParsePattern("*/*/*", td)
	if p.Match(ID{}) {
		t.Errorf("Match(zero ID) = true, want false")
	}
}

func TestParsePatternRejects(t *testing.T) {
	tests := []string{
		"",
		"kms/us-east",              // too few segments
		"kms/us-east/*/x",          // too many
		"kms/us-east/*/",           // trailing slash
		"kms/us-east/",             // trailing slash, empty last segment
		"/kms/us-east/*",           // leading slash
		"kms//*",                   // empty segment
		"kms/us-east/kms-*",        // partial wildcard
		"kms/us-*/x",               // partial wildcard
		"kms/us-east/**",           // double wildcard
		"KMS/us-east/*",            // uppercase never matches an ID: refuse it
		"kms/US-EAST/*",            // likewise
		"kms/us east/*",            // space
		"kms/./x",                  // dot segment
		"spiffe://*/kms/us-east/x", // wildcard trust domain
		"spiffe://cairn.test",      // no path
		"spiffe://Cairn.test/kms/us-east/*",
		"spiffe://cairn.test/kms/us-east/*/",
	}
	for _, in := range tests {
		t.Run(in, func(t *testing.T) {
			if p, err := ParsePattern(in, td); err == nil {
				t.Errorf("ParsePattern(%q) = %v, want error", in, p)
			}
		})
	}
	if _, err := ParsePattern("kms/us-east/*", spiffeid.TrustDomain{}); err == nil {
		t.Errorf("ParsePattern(relative, zero trust domain) = nil error, want error")
	}
}

func TestPatternString(t *testing.T) {
	for in, want := range map[string]string{
		"kms/us-east/*":                   "spiffe://cairn.test/kms/us-east/*",
		"spiffe://other.test/a/b/c":       "spiffe://other.test/a/b/c",
		"spiffe://cairn.test/kms/*/kms-1": "spiffe://cairn.test/kms/*/kms-1",
	} {
		if got := MustParsePattern(in, td).String(); got != want {
			t.Errorf("ParsePattern(%q).String() = %q, want %q", in, got, want)
		}
	}
	id := MustParse("spiffe://cairn.test/kms/us-east/kms-1")
	if got := Exact(id).String(); got != id.String() {
		t.Errorf("Exact(%s).String() = %q", id, got)
	}
}

func TestAllowlist(t *testing.T) {
	a, err := ParseAllowlist(td, "rootkms/*/*", "distributor/global/distributor-1")
	if err != nil {
		t.Fatalf("ParseAllowlist = %v", err)
	}
	tests := []struct {
		id   string
		want bool
	}{
		{"spiffe://cairn.test/rootkms/global/rootkms-1", true},
		{"spiffe://cairn.test/rootkms/us-east/replica-1", true},
		{"spiffe://cairn.test/distributor/global/distributor-1", true},
		{"spiffe://cairn.test/distributor/global/distributor-2", false},
		{"spiffe://cairn.test/kms/us-east/kms-1", false},
		{"spiffe://other.test/rootkms/global/rootkms-1", false},
	}
	for _, tt := range tests {
		id := MustParse(tt.id)
		err := a.Authorize(id)
		if got := err == nil; got != tt.want {
			t.Errorf("Authorize(%s) = %v, want allowed=%v", tt.id, err, tt.want)
		}
		if err != nil && !errors.Is(err, ErrPermissionDenied) {
			t.Errorf("Authorize(%s) = %v, want it to wrap ErrPermissionDenied", tt.id, err)
		}
	}
	var zero Allowlist
	if zero.Allows(MustParse("spiffe://cairn.test/rootkms/global/rootkms-1")) {
		t.Errorf("zero Allowlist allows an ID, want default deny")
	}
	if _, err := ParseAllowlist(td, "rootkms/*/*", "bad/*"); err == nil {
		t.Errorf("ParseAllowlist(with a bad pattern) = nil error, want error")
	}
}

func TestPolicyDefaultDeny(t *testing.T) {
	p := Policy{"/svc/Open": AllowAny(), "/svc/Nil": nil}
	id := MustParse("spiffe://cairn.test/kms/us-east/kms-1")
	if err := p.Authorize("/svc/Open", id); err != nil {
		t.Errorf("Authorize(/svc/Open) = %v, want nil", err)
	}
	for _, m := range []string{"/svc/Other", "/svc/Nil", ""} {
		if err := p.Authorize(m, id); !errors.Is(err, ErrPermissionDenied) {
			t.Errorf("Authorize(%q) = %v, want ErrPermissionDenied", m, err)
		}
	}
	if err := p.Authorize("/svc/Open", ID{}); !errors.Is(err, ErrPermissionDenied) {
		t.Errorf("Authorize(zero ID) = %v, want ErrPermissionDenied", err)
	}
}

func FuzzParsePattern(f *testing.F) {
	for _, s := range []string{"kms/us-east/*", "spiffe://cairn.test/a/b/c", "*/*/*", "a/b", "spiffe://x/y/z/w"} {
		f.Add(s, "spiffe://cairn.test/kms/us-east/kms-1")
	}
	f.Fuzz(func(t *testing.T, pattern, idStr string) {
		p, err := ParsePattern(pattern, td)
		if err != nil {
			return
		}
		// A parsed pattern round-trips through its String form.
		q, err := ParsePattern(p.String(), spiffeid.TrustDomain{})
		if err != nil || q != p {
			t.Fatalf("ParsePattern(%q).String() = %q does not re-parse to the same pattern: %v", pattern, p.String(), err)
		}
		id, err := Parse(idStr)
		if err != nil {
			return
		}
		// A match means every literal segment equals the ID's.
		if p.Match(id) {
			got := [3]string{id.Tier(), id.Region(), id.Name()}
			for i, s := range p.segs {
				if s != Wildcard && s != got[i] {
					t.Fatalf("%s matched %s but segment %d differs", p, id, i)
				}
			}
			if id.TrustDomain() != p.td {
				t.Fatalf("%s matched %s of another trust domain", p, id)
			}
		}
	})
}
