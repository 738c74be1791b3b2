// Package softhsmtest gives tests real SoftHSM2 tokens in a temp directory:
// New writes a softhsm2.conf whose token directory belongs to the test and
// points SOFTHSM2_CONF at it, and InitToken makes tokens there with
// softhsm2-util. It does not import PKCS#11 itself.
//
// SoftHSM2 reads SOFTHSM2_CONF once, at C_Initialize, and a process loads a
// PKCS#11 module once. So a test using an Env must close every safe it opened
// (which finalizes the module) before it returns, and tests using an Env
// cannot run in parallel (New uses t.Setenv, which refuses parallel tests).
// SoftHSM2 is a required test dependency: when it is missing New fails the
// test, it never skips it.
package softhsmtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// ModuleEnv names the environment variable that overrides where the SoftHSM2
// PKCS#11 library is looked for.
const ModuleEnv = "CAIRN_PKCS11_MODULE"

// modulePaths are where Debian and Ubuntu install libsofthsm2.so.
var modulePaths = []string{
	"/usr/lib/softhsm/libsofthsm2.so",
	"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
}

// missing is the failure text when SoftHSM2 is absent.
const missing = "SoftHSM2 is not installed: run `make deps` (apt-get install softhsm2)"

// Env is a SoftHSM2 configuration private to one test.
type Env struct {
	t      testing.TB
	dir    string
	conf   string
	module string
	util   string
	// tokenDirs maps a token label to its directory under tokens/, as
	// InitToken saw softhsm2-util create it.
	tokenDirs map[string]string
}

// New makes a token directory and softhsm2.conf under t.TempDir() and sets
// SOFTHSM2_CONF to it for the rest of the test. It fails the test (never
// skips it) if SoftHSM2 is not installed.
func New(t testing.TB) *Env {
	t.Helper()
	module := findModule()
	util, err := exec.LookPath("softhsm2-util")
	if module == "" || err != nil {
		t.Fatal(missing)
	}
	dir := t.TempDir()
	tokens := filepath.Join(dir, "tokens")
	if err := os.Mkdir(tokens, 0o700); err != nil {
		t.Fatalf("Mkdir(%s) = %v", tokens, err)
	}
	conf := filepath.Join(dir, "softhsm2.conf")
	text := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", tokens)
	if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
		t.Fatalf("WriteFile(%s) = %v", conf, err)
	}
	t.Setenv("SOFTHSM2_CONF", conf)
	return &Env{t: t, dir: dir, conf: conf, module: module, util: util, tokenDirs: map[string]string{}}
}

// findModule returns the SoftHSM2 library path: $CAIRN_PKCS11_MODULE if set,
// else the first of the usual install paths that exists, else "".
func findModule() string {
	if p := os.Getenv(ModuleEnv); p != "" {
		if _, err := os.Stat(p); err == nil {
			return p
		}
		return ""
	}
	for _, p := range modulePaths {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return ""
}

// Module is the absolute path of libsofthsm2.so.
func (e *Env) Module() string { return e.module }

// Dir is the test's SoftHSM2 directory (holding softhsm2.conf and tokens/).
// Tests may put other files there, such as PIN files and attempt counters.
func (e *Env) Dir() string { return e.dir }

// Conf is the path of the test's softhsm2.conf.
func (e *Env) Conf() string { return e.conf }

// InitToken initializes a token labelled label in the next free slot, with
// the given security officer and user PINs (test PINs, so passing them on
// softhsm2-util's command line is acceptable here). SoftHSM2 gives the token
// a random slot id: find it by label.
func (e *Env) InitToken(label, soPIN, userPIN string) {
	e.t.Helper()
	before := e.tokenEntries()
	cmd := exec.Command(e.util, "--init-token", "--free", "--label", label, "--so-pin", soPIN, "--pin", userPIN)
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+e.conf)
	out, err := cmd.CombinedOutput()
	if err != nil {
		e.t.Fatalf("softhsm2-util --init-token --label %s = %v: %s", label, err, strings.TrimSpace(string(out)))
	}
	for name := range e.tokenEntries() {
		if !before[name] {
			e.tokenDirs[label] = filepath.Join(e.dir, "tokens", name)
		}
	}
}

// tokenEntries returns the names in the token directory.
func (e *Env) tokenEntries() map[string]bool {
	e.t.Helper()
	entries, err := os.ReadDir(filepath.Join(e.dir, "tokens"))
	if err != nil {
		e.t.Fatalf("reading the token directory: %v", err)
	}
	out := map[string]bool{}
	for _, de := range entries {
		out[de.Name()] = true
	}
	return out
}

// TokenDir returns the directory SoftHSM2 keeps the token labelled label in
// (one of tokens/*, named by a random UUID). It fails the test for a label
// InitToken did not make.
func (e *Env) TokenDir(label string) string {
	e.t.Helper()
	d, ok := e.tokenDirs[label]
	if !ok {
		e.t.Fatalf("softhsmtest: no token labelled %q was initialized in this Env", label)
	}
	return d
}

// WritePINFile writes pin followed by a newline to a file named name in dir
// with mode 0600 and returns its path.
func WritePINFile(t testing.TB, dir, name, pin string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(pin+"\n"), 0o600); err != nil {
		t.Fatalf("WriteFile(%s) = %v", path, err)
	}
	// WriteFile applies the umask only when it creates the file; make the
	// mode exact either way.
	if err := os.Chmod(path, 0o600); err != nil {
		t.Fatalf("Chmod(%s) = %v", path, err)
	}
	return path
}
