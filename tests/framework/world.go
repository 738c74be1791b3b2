package framework

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/cairnkms/cairn/internal/devca"
	"github.com/cairnkms/cairn/internal/identity"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/safe/pkcs11safe/softhsmtest"
)

// TrustDomain is the trust domain of every world's dev CA.
const TrustDomain = "e2e.cairn.test"

// World is one scenario's universe on disk: a dev CA with certificates for
// every component (written by the real `cairn dev certs`), safe configs,
// distributor state directories, manifests and every process's output, all
// under Dir, which the secret scan walks.
type World struct {
	T   testing.TB
	Bin *Binaries
	// Dir holds everything the scenario writes.
	Dir string
	// Certs is the dev CA directory; Logs holds every process's output.
	Certs, Logs string
	// Dialer, if set, opens the connections the framework makes to the
	// servers (Host.Dial: from a host of a Network); nil dials directly.
	Dialer func(ctx context.Context, addr string) (net.Conn, error)

	mu      sync.Mutex
	runs    int
	sources map[string]*identity.Source
}

// NewWorld makes a world in a new temporary directory and writes its
// certificates: 3 distributors, 3 root KMS replicas (rootkms-1..3), 1 KMS
// node in each of us-east and eu-west, 5 officers, regionctl and a demo
// client per region. Mint adds other identities.
func NewWorld(t testing.TB, bin *Binaries) *World {
	t.Helper()
	dir := t.TempDir()
	w := &World{T: t, Bin: bin, Dir: dir, Certs: filepath.Join(dir, "certs"), Logs: filepath.Join(dir, "logs"), sources: map[string]*identity.Source{}}
	r := w.Run("cairn-dev-certs", bin.Cairn, "dev", "certs", "--out", w.Certs, "--trust-domain", TrustDomain,
		"--regions", "us-east,eu-west", "--distributors", "3", "--rootkms", "3", "--kms-per-region", "1", "--officers", "5")
	if r.ExitCode != 0 {
		t.Fatalf("cairn dev certs failed:\n%s", r)
	}
	return w
}

// Mint issues certificates from the world's dev CA for identities that
// `cairn dev certs` does not make (a non-voting replica, KMS nodes of any
// region), each name <tier>/<region>/<name>, where --dev-certs expects them.
// Mint an identity before starting a process that runs as it.
func (w *World) Mint(names ...string) {
	w.T.Helper()
	ca, err := devca.Load(w.Certs)
	if err != nil {
		w.T.Fatalf("devca.Load(%s) = %v", w.Certs, err)
	}
	td := spiffeid.RequireTrustDomainFromString(TrustDomain)
	for _, name := range names {
		id, err := spiffeid.FromPath(td, "/"+name)
		if err != nil {
			w.T.Fatalf("Mint(%q): %v", name, err)
		}
		leaf, err := ca.Issue(id, devca.LeafOptions{})
		if err != nil {
			w.T.Fatalf("Issue(%s) = %v", id, err)
		}
		if err := leaf.Save(devca.LeafPaths(w.Certs, id)); err != nil {
			w.T.Fatalf("saving the leaf of %s: %v", id, err)
		}
	}
}

// Run runs a one-shot command; its output is kept under Logs as
// <n>-<name>.stdout|stderr.
func (w *World) Run(name, path string, args ...string) Result {
	w.T.Helper()
	w.mu.Lock()
	w.runs++
	n := w.runs
	w.mu.Unlock()
	return Run(w.T, fmt.Sprintf("%03d-%s", n, name), w.Logs, path, args)
}

// IDFlags are the identity flags that make a binary run as name
// (<tier>/<region>/<name>, e.g. "officer/global/officer-1").
func (w *World) IDFlags(name string) []string {
	return []string{"--trust-domain", TrustDomain, "--dev-certs", w.Certs, "--name", name}
}

// SPIFFEID returns the full SPIFFE ID of name.
func SPIFFEID(name string) string { return "spiffe://" + TrustDomain + "/" + name }

// Officer returns officer i's name, "officer/global/officer-<i>".
func Officer(i int) string { return fmt.Sprintf("officer/global/officer-%d", i) }

// Source returns the identity of name from the dev CA, loaded once.
func (w *World) Source(name string) *identity.Source {
	w.T.Helper()
	w.mu.Lock()
	defer w.mu.Unlock()
	if s, ok := w.sources[name]; ok {
		return s
	}
	f := identity.Flags{TrustDomain: TrustDomain, DevCerts: w.Certs, Name: name}
	s, err := f.Source(nil)
	if err != nil {
		w.T.Fatalf("identity %s: %v", name, err)
	}
	w.sources[name] = s
	return s
}

// Safe runs the safe tool with args.
func (w *World) Safe(args ...string) Result {
	w.T.Helper()
	name := "safe"
	if len(args) > 0 {
		name += "-" + args[0]
		if args[0] == "ceremony" && len(args) > 1 {
			name += "-" + args[1]
		}
	}
	return w.Run(name, w.Bin.Safe, args...)
}

// SafeOK runs the safe tool and fails the test unless it exits 0.
func (w *World) SafeOK(args ...string) Result {
	w.T.Helper()
	r := w.Safe(args...)
	if r.ExitCode != 0 {
		w.T.Fatalf("safe failed:\n%s", r)
	}
	return r
}

// SafeConfig is one safe's config file and where the safe keeps its data.
type SafeConfig struct {
	// Path is the JSON config file given to `safe --safe`.
	Path string
	// Label is the safe's label (the file safe's name, or the token label).
	Label string
	// Storage is where the safe's sealed shares live (the file safe's
	// directory; for a token, SoftHSM2's token directory).
	Storage string
	// Unlock is what opens the safe (a token's user PIN, a file safe's
	// passphrase), with its file as Home: the secret scans look for it
	// everywhere else.
	Unlock Secret
}

// FileSafes writes n insecure-file safe configs (labels safe-1..safe-n,
// passphrase files mode 0600, a small argon2id memory to keep tests fast).
// The safes themselves are created by the first command that opens them.
func (w *World) FileSafes(n int) []SafeConfig {
	w.T.Helper()
	dir := filepath.Join(w.Dir, "safes")
	var out []SafeConfig
	for i := 1; i <= n; i++ {
		label := fmt.Sprintf("safe-%d", i)
		pass := filepath.Join(dir, label+".passphrase")
		passphrase := fmt.Sprintf("e2e passphrase for %s", label)
		w.writeFile(pass, passphrase+"\n", 0o600)
		sc := SafeConfig{Path: filepath.Join(dir, label+".json"), Label: label, Storage: filepath.Join(dir, label),
			Unlock: Secret{Name: "passphrase of " + label, Value: []byte(passphrase), Home: pass}}
		w.writeJSON(sc.Path, map[string]any{
			"kind": safe.KindInsecureFile, "label": label, "dir": sc.Storage, "passphrase_file": pass,
			"kdf_memory_kib": 8192, "attempt_dir": filepath.Join(dir, "attempts"),
		})
		out = append(out, sc)
	}
	return out
}

// PKCS11Safes makes n SoftHSM2 tokens (labels safe-1..safe-n) in env, with
// PIN files mode 0600, and writes a pkcs11 safe config for each. Make every
// token before any process, this one included, loads the PKCS#11 module:
// SoftHSM2 sees only the tokens that existed when it was initialized.
func (w *World) PKCS11Safes(env *softhsmtest.Env, n int) []SafeConfig {
	w.T.Helper()
	dir := filepath.Join(w.Dir, "safes")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		w.T.Fatal(err)
	}
	var out []SafeConfig
	for i := 1; i <= n; i++ {
		label := fmt.Sprintf("safe-%d", i)
		// At least 16 bytes, so that the secret scans can look for it.
		userPIN := fmt.Sprintf("user-pin-%d-of-the-e2e-tests", 1000+i)
		env.InitToken(label, fmt.Sprintf("so-pin-%d", 9000+i), userPIN)
		pin := softhsmtest.WritePINFile(w.T, dir, label+".pin", userPIN)
		sc := SafeConfig{Path: filepath.Join(dir, label+".json"), Label: label, Storage: filepath.Join(env.Dir(), "tokens"),
			Unlock: Secret{Name: "user PIN of " + label, Value: []byte(userPIN), Home: pin}}
		w.writeJSON(sc.Path, map[string]any{
			"kind": safe.KindPKCS11, "module": env.Module(), "token_label": label, "pin_file": pin,
			"attempt_dir": filepath.Join(dir, "attempts"),
		})
		out = append(out, sc)
	}
	return out
}

func (w *World) writeFile(path, content string, mode os.FileMode) {
	w.T.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		w.T.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		w.T.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		w.T.Fatal(err)
	}
}

func (w *World) writeJSON(path string, v any) {
	w.T.Helper()
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		w.T.Fatal(err)
	}
	w.writeFile(path, string(b)+"\n", 0o600)
}

// Genesis runs `safe genesis` as officer-1: a threshold-of-len(safes) split
// into the safes, share i bound to officer i, the key handed to the given
// distributors. It returns the manifest.
func (w *World) Genesis(threshold int, safes []SafeConfig, to ...*Distributor) *safev1.GenesisManifest {
	w.T.Helper()
	path := filepath.Join(w.Dir, "manifest.json")
	args := append([]string{"genesis"}, w.IDFlags(Officer(1))...)
	args = append(args, "--threshold", fmt.Sprint(threshold), "--manifest", path)
	var officers []string
	for i, s := range safes {
		args = append(args, "--safe", s.Path)
		officers = append(officers, SPIFFEID(Officer(i+1)))
	}
	args = append(args, "--officers", strings.Join(officers, ","))
	for _, d := range to {
		args = append(args, "--distributor", d.Addr)
	}
	w.SafeOK(args...)
	m, err := safe.ReadManifest(path)
	if err != nil {
		w.T.Fatalf("safe.ReadManifest(%s) = %v", path, err)
	}
	return m
}

// ManifestPath is where Genesis writes the manifest.
func (w *World) ManifestPath() string { return filepath.Join(w.Dir, "manifest.json") }

var ceremonyLine = regexp.MustCompile(`(?m)^ceremony ([0-9a-f]{32}) \(UNSEAL\): OPEN, `)

// OpenCeremony runs `safe ceremony open` on d as officer i and returns the
// ceremony id it prints.
func (w *World) OpenCeremony(d *Distributor, officer int) string {
	w.T.Helper()
	args := append([]string{"ceremony", "open", "--distributor", d.Addr}, w.IDFlags(Officer(officer))...)
	r := w.SafeOK(args...)
	m := ceremonyLine.FindStringSubmatch(r.Stdout)
	if m == nil {
		w.T.Fatalf("safe ceremony open printed %q, want a line matching %s", r.Stdout, ceremonyLine)
	}
	return m[1]
}

// Release runs `safe release` into ceremony id on d as the identity name
// with the given safe.
func (w *World) Release(d *Distributor, id, name string, s SafeConfig) Result {
	w.T.Helper()
	args := append([]string{"release", "--distributor", d.Addr, "--ceremony", id, "--safe", s.Path, "--manifest", w.ManifestPath()}, w.IDFlags(name)...)
	return w.Safe(args...)
}
