package devca_test

import (
	"crypto/tls"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cairnkms/cairn/internal/devca"
	"github.com/google/go-cmp/cmp"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

func writeChain(t *testing.T, dir string, p devca.Plan, now time.Time) (*devca.CA, []devca.Written) {
	t.Helper()
	ca, written, err := devca.WriteChain(dir, p, now)
	if err != nil {
		t.Fatalf("WriteChain(%s, %s, %s) error = %v", dir, p.TrustDomain, now, err)
	}
	return ca, written
}

// checkChain checks that dir holds a sound leaf for every ID of p, valid at
// now, with the modes WriteChain promises.
func checkChain(t *testing.T, dir string, p devca.Plan, written []devca.Written, now time.Time) {
	t.Helper()
	bundle, err := x509bundle.Load(p.TrustDomain, filepath.Join(dir, "ca.pem"))
	if err != nil {
		t.Fatalf("x509bundle.Load(%s) error = %v", dir, err)
	}
	ids := p.IDs()
	if len(written) != len(ids) {
		t.Fatalf("WriteChain(%s) wrote %d leaves, want %d", dir, len(written), len(ids))
	}
	checkMode(t, dir, 0o700)
	checkMode(t, filepath.Join(dir, "ca.pem"), 0o644)
	checkMode(t, filepath.Join(dir, "ca-key.pem"), 0o600)
	for i, w := range written {
		certPath, keyPath := devca.LeafPaths(dir, ids[i])
		if w.ID != ids[i] || w.CertPath != certPath || w.KeyPath != keyPath {
			t.Errorf("WriteChain(%s)[%d] = %+v, want ID %s at %s and %s", dir, i, w, ids[i], certPath, keyPath)
		}
		certPEM, err := os.ReadFile(certPath)
		if err != nil {
			t.Errorf("ReadFile(%s) error = %v", certPath, err)
			continue
		}
		got, _, err := x509svid.ParseAndVerify([][]byte{pemBytes(t, certPEM)}, bundle, x509svid.WithTime(now))
		if err != nil || got != ids[i] {
			t.Errorf("ParseAndVerify(%s) = %s, %v, want %s, nil", certPath, got, err, ids[i])
		}
		if _, err := tls.LoadX509KeyPair(certPath, keyPath); err != nil {
			t.Errorf("LoadX509KeyPair(%s, %s) error = %v", certPath, keyPath, err)
		}
		checkMode(t, certPath, 0o644)
		checkMode(t, keyPath, 0o600)
		for d := filepath.Dir(certPath); d != dir; d = filepath.Dir(d) {
			checkMode(t, d, 0o700)
		}
	}
}

func checkMode(t *testing.T, path string, want fs.FileMode) {
	t.Helper()
	if got := mode(t, path); got != want {
		t.Errorf("mode of %s = %#o, want %#o", path, got, want)
	}
}

func pemBytes(t *testing.T, b []byte) []byte {
	t.Helper()
	certs, err := parseBundle(b)
	if err != nil || len(certs) != 1 {
		t.Fatalf("parse %q = %d certificates, %v, want 1, nil", b, len(certs), err)
	}
	return certs[0].Raw
}

func reused(written []devca.Written) map[string]bool {
	m := map[string]bool{}
	for _, w := range written {
		m[w.ID.String()] = w.Reused
	}
	return m
}

// wantReused is the Reused map for p where only the listed IDs were issued.
func wantReused(p devca.Plan, issued ...spiffeid.ID) map[string]bool {
	m := map[string]bool{}
	for _, id := range p.IDs() {
		m[id.String()] = true
	}
	for _, id := range issued {
		m[id.String()] = false
	}
	return m
}

func TestWriteChain(t *testing.T) {
	td := mustTD(t, "dev.cairn.test")
	p := devca.DefaultPlan(td)
	dir := filepath.Join(t.TempDir(), "certs")
	now := time.Now()

	ca, first := writeChain(t, dir, p, now)
	checkChain(t, dir, p, first, now)
	if got, want := ca.TrustDomain(), td; got != want {
		t.Errorf("WriteChain(%s).TrustDomain() = %s, want %s", dir, got, want)
	}
	if diff := cmp.Diff(wantReused(p, p.IDs()...), reused(first)); diff != "" {
		t.Errorf("first WriteChain(%s) Reused mismatch (-want +got):\n%s", dir, diff)
	}
	before := snapshot(t, dir)

	t.Run("second run keeps everything", func(t *testing.T) {
		ca2, second := writeChain(t, dir, p, now)
		if diff := cmp.Diff(wantReused(p), reused(second)); diff != "" {
			t.Errorf("second WriteChain(%s) Reused mismatch (-want +got):\n%s", dir, diff)
		}
		if diff := cmp.Diff(before, snapshot(t, dir)); diff != "" {
			t.Errorf("second WriteChain(%s) changed files (-before +after):\n%s", dir, diff)
		}
		if !ca2.Certificate().Equal(ca.Certificate()) {
			t.Errorf("second WriteChain(%s) CA = %v, want the first run's %v", dir, ca2, ca)
		}
	})

	t.Run("a deleted leaf alone is reissued", func(t *testing.T) {
		target := mustID(t, td, "kms", "eu-west", "kms-1")
		certPath, keyPath := devca.LeafPaths(dir, target)
		if err := os.RemoveAll(filepath.Dir(certPath)); err != nil {
			t.Fatal(err)
		}
		_, third := writeChain(t, dir, p, now)
		checkChain(t, dir, p, third, now)
		if diff := cmp.Diff(wantReused(p, target), reused(third)); diff != "" {
			t.Errorf("WriteChain(%s) after deleting %s: Reused mismatch (-want +got):\n%s", dir, target, diff)
		}
		after := snapshot(t, dir)
		for _, path := range []string{certPath, keyPath} {
			if after[path] == before[path] {
				t.Errorf("WriteChain(%s) after deleting %s: %s is unchanged, want a new leaf", dir, target, path)
			}
			delete(after, path)
			delete(before, path)
		}
		if diff := cmp.Diff(before, after); diff != "" {
			t.Errorf("WriteChain(%s) after deleting %s changed other files (-before +after):\n%s", dir, target, diff)
		}
	})
}

func TestWriteChainReissuesBadLeaf(t *testing.T) {
	td := mustTD(t, "dev.cairn.test")
	p := devca.DefaultPlan(td)
	now := time.Now()
	target := mustID(t, td, "rootkms", "global", "rootkms-2")
	neighbour := mustID(t, td, "rootkms", "global", "rootkms-1")
	otherCA := newCA(t, td)

	// Each damage is done to target's files in a freshly written chain.
	tests := []struct {
		name   string
		damage func(t *testing.T, dir string, ca *devca.CA)
		kept   bool
	}{
		{"untouched", func(*testing.T, string, *devca.CA) {}, true},
		{"cert missing", func(t *testing.T, dir string, _ *devca.CA) {
			removeFile(t, leafCert(dir, target))
		}, false},
		{"key missing", func(t *testing.T, dir string, _ *devca.CA) {
			removeFile(t, leafKey(dir, target))
		}, false},
		{"cert garbage", func(t *testing.T, dir string, _ *devca.CA) {
			writeFile(t, leafCert(dir, target), []byte("garbage"), 0o644)
		}, false},
		{"key garbage", func(t *testing.T, dir string, _ *devca.CA) {
			writeFile(t, leafKey(dir, target), []byte("garbage"), 0o600)
		}, false},
		{"key of another leaf", func(t *testing.T, dir string, _ *devca.CA) {
			copyFile(t, leafKey(dir, neighbour), leafKey(dir, target))
		}, false},
		{"cert and key of another identity", func(t *testing.T, dir string, _ *devca.CA) {
			copyFile(t, leafCert(dir, neighbour), leafCert(dir, target))
			copyFile(t, leafKey(dir, neighbour), leafKey(dir, target))
		}, false},
		{"leaf of another CA", func(t *testing.T, dir string, _ *devca.CA) {
			saveLeaf(t, dir, issue(t, otherCA, target, devca.LeafOptions{}))
		}, false},
		{"key readable by group", func(t *testing.T, dir string, _ *devca.CA) {
			if err := os.Chmod(leafKey(dir, target), 0o640); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"leaf expiring in 6 days", func(t *testing.T, dir string, ca *devca.CA) {
			saveLeaf(t, dir, issue(t, ca, target, devca.LeafOptions{NotAfter: now.Add(6 * 24 * time.Hour)}))
		}, false},
		{"leaf expiring in 8 days", func(t *testing.T, dir string, ca *devca.CA) {
			saveLeaf(t, dir, issue(t, ca, target, devca.LeafOptions{NotAfter: now.Add(8 * 24 * time.Hour)}))
		}, true},
		{"leaf not yet valid", func(t *testing.T, dir string, ca *devca.CA) {
			saveLeaf(t, dir, issue(t, ca, target, devca.LeafOptions{NotBefore: now.Add(time.Hour)}))
		}, false},
		{"expired leaf", func(t *testing.T, dir string, ca *devca.CA) {
			saveLeaf(t, dir, issue(t, ca, target, devca.LeafOptions{NotAfter: now.Add(-time.Hour)}))
		}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "certs")
			ca, _ := writeChain(t, dir, p, now)
			tt.damage(t, dir, ca)
			_, written := writeChain(t, dir, p, now)
			checkChain(t, dir, p, written, now)
			want := wantReused(p, target)
			if tt.kept {
				want = wantReused(p)
			}
			if diff := cmp.Diff(want, reused(written)); diff != "" {
				t.Errorf("WriteChain(%s) after %s: Reused mismatch (-want +got):\n%s", dir, tt.name, diff)
			}
		})
	}
}

func leafCert(dir string, id spiffeid.ID) string { c, _ := devca.LeafPaths(dir, id); return c }
func leafKey(dir string, id spiffeid.ID) string  { _, k := devca.LeafPaths(dir, id); return k }

func saveLeaf(t *testing.T, dir string, leaf *devca.Leaf) {
	t.Helper()
	c, k := devca.LeafPaths(dir, leaf.ID)
	if err := leaf.Save(c, k); err != nil {
		t.Fatalf("Save(%s, %s) error = %v", c, k, err)
	}
}

func removeFile(t *testing.T, path string) {
	t.Helper()
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
}

func writeFile(t *testing.T, path string, b []byte, perm fs.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, b, perm); err != nil {
		t.Fatal(err)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, to, b, mode(t, to))
}

func TestWriteChainRenewal(t *testing.T) {
	td := mustTD(t, "dev.cairn.test")
	p := devca.DefaultPlan(td)
	start := time.Now()
	year := 365 * 24 * time.Hour
	day := 24 * time.Hour
	tests := []struct {
		name  string
		later time.Duration
		kept  bool
	}{
		{"a day later", day, true},
		{"8 days before leaf expiry", year - 8*day, true},
		{"6 days before leaf expiry", year - 6*day, false},
		{"an hour short of the 7-day margin", year - 7*day + time.Hour, false},
		{"after leaf expiry", year + day, false},
		{"9 years later", 9 * year, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "certs")
			writeChain(t, dir, p, start)
			now := start.Add(tt.later)
			_, written := writeChain(t, dir, p, now)
			checkChain(t, dir, p, written, now)
			want := wantReused(p, p.IDs()...)
			if tt.kept {
				want = wantReused(p)
			}
			if diff := cmp.Diff(want, reused(written)); diff != "" {
				t.Errorf("WriteChain(%s) %s: Reused mismatch (-want +got):\n%s", dir, tt.name, diff)
			}
			// Renewed or not, the chain is now stable at that time.
			_, again := writeChain(t, dir, p, now)
			if diff := cmp.Diff(wantReused(p), reused(again)); diff != "" {
				t.Errorf("WriteChain(%s) %s, run again: Reused mismatch (-want +got):\n%s", dir, tt.name, diff)
			}
		})
	}
}

func TestWriteChainRefuses(t *testing.T) {
	td := mustTD(t, "dev.cairn.test")
	now := time.Now()
	tests := []struct {
		name  string
		setup func(t *testing.T, dir string) // prepares dir, which does not exist yet
		plan  devca.Plan
		now   time.Time
	}{
		{
			name:  "invalid plan",
			setup: func(*testing.T, string) {},
			plan:  devca.Plan{TrustDomain: td, Regions: []string{"global"}, Distributors: 1, RootKMS: 1, KMSPerRegion: 1, Officers: 1},
			now:   now,
		},
		{
			name: "CA of another trust domain",
			setup: func(t *testing.T, dir string) {
				writeChain(t, dir, devca.DefaultPlan(mustTD(t, "other.cairn.test")), now)
			},
			plan: devca.DefaultPlan(td),
			now:  now,
		},
		{
			name:  "CA expired",
			setup: func(t *testing.T, dir string) { writeChain(t, dir, devca.DefaultPlan(td), now) },
			plan:  devca.DefaultPlan(td),
			now:   now.Add(11 * 365 * 24 * time.Hour),
		},
		{
			name:  "CA not yet valid",
			setup: func(t *testing.T, dir string) { writeChain(t, dir, devca.DefaultPlan(td), now) },
			plan:  devca.DefaultPlan(td),
			now:   now.Add(-time.Hour),
		},
		{
			name: "CA key readable by others",
			setup: func(t *testing.T, dir string) {
				writeChain(t, dir, devca.DefaultPlan(td), now)
				chmod("ca-key.pem", 0o644)(t, dir)
			},
			plan: devca.DefaultPlan(td),
			now:  now,
		},
		{
			name: "CA key missing",
			setup: func(t *testing.T, dir string) {
				writeChain(t, dir, devca.DefaultPlan(td), now)
				remove("ca-key.pem")(t, dir)
			},
			plan: devca.DefaultPlan(td),
			now:  now,
		},
		{
			name: "ca.pem corrupt",
			setup: func(t *testing.T, dir string) {
				writeChain(t, dir, devca.DefaultPlan(td), now)
				write("ca.pem", "corrupt", 0o644)(t, dir)
			},
			plan: devca.DefaultPlan(td),
			now:  now,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "certs")
			tt.setup(t, dir)
			_, statErr := os.Stat(dir)
			var before map[string]string
			if statErr == nil {
				before = snapshot(t, dir)
			}
			if _, _, err := devca.WriteChain(dir, tt.plan, tt.now); err == nil {
				t.Errorf("WriteChain(%s, %s, %s) error = nil, want error", dir, tt.plan.TrustDomain, tt.now)
			}
			if statErr != nil {
				if _, err := os.Stat(dir); err == nil {
					t.Errorf("WriteChain(%s) failed but created the directory", dir)
				}
				return
			}
			if diff := cmp.Diff(before, snapshot(t, dir)); diff != "" {
				t.Errorf("WriteChain(%s) failed but changed files (-before +after):\n%s", dir, diff)
			}
		})
	}
}
