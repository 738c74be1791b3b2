package serverconfig_test

import (
	"errors"
	"flag"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/cairnkms/cairn/internal/serverconfig"
)

// testSpec and newTest are a small binary "test" with a flag of every kind.
var testSpec = serverconfig.Spec{
	Binary:  "test",
	Rename:  map[string]string{"v": "verbose"},
	Lists:   []string{"peers"},
	Secrets: []string{"hsm-login"},
	Checks: map[string]serverconfig.Check{
		"listen": serverconfig.BindAddr,
		"peers":  serverconfig.Optional(serverconfig.PeerAddrList),
		"format": serverconfig.OneOf("text", "json"),
	},
}

type testFlags struct {
	listen, peers, format, name string
	pin, pinFile, hsmLogin      string
	verbose                     bool
	workers                     int
	ttl                         time.Duration
}

func newTest() (*flag.FlagSet, *testFlags, *serverconfig.Flags) {
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	f := &testFlags{}
	fs.StringVar(&f.listen, "listen", "127.0.0.1:7000", "")
	fs.StringVar(&f.peers, "peers", "", "comma-separated")
	fs.StringVar(&f.format, "format", "text", "")
	fs.StringVar(&f.name, "name", "", "")
	fs.StringVar(&f.pin, "pin", "", "a secret by name")
	fs.StringVar(&f.pinFile, "pin-file", "", "a path, not a secret")
	fs.StringVar(&f.hsmLogin, "hsm-login", "", "a secret by Spec.Secrets")
	fs.BoolVar(&f.verbose, "v", false, "")
	fs.IntVar(&f.workers, "workers", 4, "")
	fs.DurationVar(&f.ttl, "ttl", 30*time.Minute, "")
	return fs, f, serverconfig.Register(fs, testSpec)
}

// load parses args, then the file holding yaml (if not "") and env.
func load(t *testing.T, yaml string, args []string, env ...string) (*testFlags, *serverconfig.Config, string, error) {
	t.Helper()
	fs, f, cf := newTest()
	path := ""
	if yaml != "" {
		path = filepath.Join(t.TempDir(), "test.yaml")
		if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
			t.Fatal(err)
		}
		args = append([]string{"--config", path}, args...)
	}
	if err := fs.Parse(args); err != nil {
		t.Fatalf("Parse(%q) = %v", args, err)
	}
	cfg, err := cf.Load(fs, env)
	return f, cfg, path, err
}

func TestFileSetsEveryKind(t *testing.T) {
	f, cfg, _, err := load(t, `
# every kind of value
listen: "0.0.0.0:7100"
peers: [a.example:1, b.example:2]
format: json
name: kms/us-east/kms-1
verbose: true
workers: 16
ttl: 45s
`, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := testFlags{listen: "0.0.0.0:7100", peers: "a.example:1,b.example:2", format: "json", name: "kms/us-east/kms-1", verbose: true, workers: 16, ttl: 45 * time.Second}
	if diff := cmp.Diff(want, *f, cmp.AllowUnexported(testFlags{})); diff != "" {
		t.Errorf("settings from the file (-want +got):\n%s", diff)
	}
	if got := cfg.Origin("workers"); got != serverconfig.FromFile {
		t.Errorf("Origin(workers) = %v, want FromFile", got)
	}
	if cfg.IsSet("pin") {
		t.Error("IsSet(pin) = true for a setting given nowhere")
	}
}

func TestJSONFile(t *testing.T) {
	f, _, _, err := load(t, `{"listen": "127.0.0.1:7200", "peers": "a:1,b:2", "workers": 2, "verbose": false}`, nil)
	if err != nil {
		t.Fatal(err)
	}
	if f.listen != "127.0.0.1:7200" || f.peers != "a:1,b:2" || f.workers != 2 {
		t.Errorf("JSON file gave %+v", *f)
	}
}

func TestEmptyFileSetsNothing(t *testing.T) {
	f, _, _, err := load(t, "# nothing yet\n", nil)
	if err != nil || f.listen != "127.0.0.1:7000" {
		t.Errorf("a file of comments: listen %q, err %v; want the default and no error", f.listen, err)
	}
}

func TestFileRefusals(t *testing.T) {
	tests := []struct {
		name, yaml, want string
	}{
		{"unknown key", "listen: \"127.0.0.1:1\"\nlisen: x\n", `:2: unknown key "lisen" (did you mean "listen"?)`},
		{"flag spelling of a key", "pin-file: /x\n", `:1: unknown key "pin-file" (did you mean "pin_file"?)`},
		{"unknown key, nothing close", "frobnicate: 1\n", `:1: unknown key "frobnicate"`},
		{"config is no key", "config: other.yaml\n", `unknown key "config"`},
		{"key twice", "name: a\nname: b\n", `:2: name: given twice (first on line 1)`},
		{"bad host:port", "listen: \"127.0.0.1:99999\"\n", `:1: listen: "127.0.0.1:99999" is not a host:port`},
		{"not one of", "format: yaml\n", `:1: format: "yaml" is not one of text, json`},
		{"peer not dialable", "peers: [\"0.0.0.0:7101\"]\n", `:1: peers: "0.0.0.0:7101" lists "0.0.0.0:7101", which is not an address others can reach`},
		{"string for an int", "workers: many\n", `:1: workers: "many": want an integer`},
		{"negative int", "workers: -1\n", `:1: workers: "-1" must not be negative`},
		{"float for an int", "workers: 1.5\n", `workers: "1.5": want an integer`},
		{"number for a duration", "ttl: 30\n", `:1: ttl: 30: want a duration with its unit`},
		{"bad duration", "ttl: soon\n", `:1: ttl: "soon" is not a duration`},
		{"negative duration", "ttl: -1s\n", `ttl: "-1s" must not be negative`},
		{"yes for a bool", "verbose: yes\n", `:1: verbose: "yes": want true or false`},
		{"number for a string", "name: 12\n", `:1: name: 12: want a string (quote it)`},
		{"null", "name:\n", `:1: name: no value`},
		{"list for a single value", "name: [a, b]\n", `name: want a single value, not a list`},
		{"list item with a comma", "peers: [\"a:1,b:2\"]\n", `peers: line 1: want each item a non-empty string without commas`},
		{"mapping value", "name: {a: b}\n", `name: want a value, not a mapping`},
		{"alias", "name: &n x\nformat: *n\n", `anchors and aliases are not supported`},
		{"top-level list", "- a\n- b\n", `:1: want a mapping of settings`},
		{"two documents", "name: a\n---\nname: b\n", `want one YAML document, found more`},
		{"not YAML", "name: \"unterminated\n", `test config `},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, path, err := load(t, tt.yaml, nil)
			if err == nil {
				t.Fatalf("Load(%q) = nil error, want %q", tt.yaml, tt.want)
			}
			if !strings.HasPrefix(err.Error(), "test config "+path) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Load(%q) = %q, want it to start with %q and contain %q", tt.yaml, err, "test config "+path, tt.want)
			}
		})
	}
}

// A value on the command line still does not excuse a broken file.
func TestFileCheckedEvenWhereFlagsWin(t *testing.T) {
	_, _, _, err := load(t, "workers: many\n", []string{"--workers", "3"})
	if err == nil || !strings.Contains(err.Error(), "workers") {
		t.Errorf("Load = %v, want the file's bad workers refused", err)
	}
}

func TestEnvAndFlagRefusalsNameTheSetting(t *testing.T) {
	tests := []struct {
		name string
		args []string
		env  []string
		want string
	}{
		{"env bad host:port", nil, []string{"CAIRN_TEST_LISTEN=127.0.0.1:99999"}, `test: CAIRN_TEST_LISTEN: "127.0.0.1:99999" is not a host:port (port 99999 is not in 0-65535)`},
		{"env bad int", nil, []string{"CAIRN_TEST_WORKERS=x"}, `test: CAIRN_TEST_WORKERS: "x" is not an integer`},
		{"env bad bool", nil, []string{"CAIRN_TEST_VERBOSE=maybe"}, `test: CAIRN_TEST_VERBOSE: "maybe" is not true or false`},
		{"env unknown", nil, []string{"CAIRN_TEST_LISTN=x"}, `test: unknown environment variable CAIRN_TEST_LISTN (did you mean "CAIRN_TEST_LISTEN"?)`},
		{"flag bad host:port", []string{"--listen", "nohost"}, nil, `test: --listen: "nohost" is not a host:port`},
		{"flag negative", []string{"--ttl", "-5m"}, nil, `test: --ttl: "-5m0s" must not be negative`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, _, err := load(t, "", tt.args, tt.env...)
			if err == nil || err.Error() != tt.want {
				t.Errorf("Load(%q, env %q) = %v, want %q", tt.args, tt.env, err, tt.want)
			}
		})
	}
}

func TestPrecedence(t *testing.T) {
	const file = "listen: \"127.0.0.1:7001\"\nworkers: 1\nname: from-file\n"
	f, cfg, _, err := load(t, file,
		[]string{"--listen", "127.0.0.1:7003"},
		"CAIRN_TEST_LISTEN=127.0.0.1:7002", "CAIRN_TEST_WORKERS=2", "OTHER_VAR=1", "CAIRN_OTHER_X=1")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, got, want string
		origin          serverconfig.Origin
	}{
		{"listen", f.listen, "127.0.0.1:7003", serverconfig.FromFlag},   // flag > env > file
		{"workers", strconv.Itoa(f.workers), "2", serverconfig.FromEnv}, // env > file
		{"name", f.name, "from-file", serverconfig.FromFile},            // file > default
		{"format", f.format, "text", serverconfig.FromDefault},
	} {
		if c.got != c.want || cfg.Origin(c.name) != c.origin {
			t.Errorf("%s = %q from %v, want %q from %v", c.name, c.got, cfg.Origin(c.name), c.want, c.origin)
		}
	}
}

func TestConfigFromEnvironment(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.yaml"), filepath.Join(dir, "b.yaml")
	for p, body := range map[string]string{a: "name: a\n", b: "name: b\n"} {
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "a"},                          // $CAIRN_TEST_CONFIG
		{[]string{"--config", b}, "b"},      // --config wins over it
		{[]string{"--config", ""}, "unset"}, // and can turn it off
	} {
		fs, f, cf := newTest()
		if err := fs.Parse(tc.args); err != nil {
			t.Fatal(err)
		}
		cfg, err := cf.Load(fs, []string{"CAIRN_TEST_CONFIG=" + a})
		if err != nil {
			t.Fatal(err)
		}
		got := f.name
		if got == "" {
			got = "unset"
		}
		if got != tc.want {
			t.Errorf("args %q with CAIRN_TEST_CONFIG=a.yaml: name %q (file %q), want %q", tc.args, got, cfg.File(), tc.want)
		}
	}
}

func TestMissingFile(t *testing.T) {
	fs, _, cf := newTest()
	fs.Parse([]string{"--config", "/nonexistent/test.yaml"})
	if _, err := cf.Load(fs, nil); err == nil || !strings.Contains(err.Error(), "test: --config: open /nonexistent/test.yaml") {
		t.Errorf("Load with a missing --config = %v", err)
	}
}

// TestPrint pins --print-config: every key sorted with its origin, secrets
// (pin by name, hsm_login by Spec.Secrets) never printed, paths to secrets
// printed.
func TestPrint(t *testing.T) {
	_, cfg, path, err := load(t, "pin: \"123456\"\npin_file: /etc/cairn/pin\npeers: [a:1, b:2]\n",
		[]string{"--workers", "8"}, "CAIRN_TEST_HSM_LOGIN=hunter2", "CAIRN_TEST_TTL=1h")
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	if err := cfg.Print(&b); err != nil {
		t.Fatal(err)
	}
	want := `# test: effective settings; flags > environment (CAIRN_TEST_*) > config file ` + path + ` > defaults
format: "text"  # default
# hsm_login: <redacted>  # CAIRN_TEST_HSM_LOGIN
listen: "127.0.0.1:7000"  # default
name: ""  # default
peers: ["a:1","b:2"]  # file, line 3
# pin: <redacted>  # file, line 1
pin_file: "/etc/cairn/pin"  # file, line 2
ttl: "1h0m0s"  # CAIRN_TEST_TTL
verbose: false  # default
workers: 8  # --workers
`
	if diff := cmp.Diff(want, b.String()); diff != "" {
		t.Errorf("Print (-want +got):\n%s", diff)
	}
	for _, secret := range []string{"123456", "hunter2"} {
		if strings.Contains(b.String(), secret) {
			t.Errorf("Print wrote the secret %q", secret)
		}
	}
}

// TestPrintRoundTrip feeds Print's output back as the config file: the
// same settings come out (secrets left unset, as printed).
func TestPrintRoundTrip(t *testing.T) {
	f1, cfg, _, err := load(t, "name: \"a \\\"quoted\\\" name\"\npeers: [a:1]\nverbose: true\n", []string{"--ttl", "90s"}, "CAIRN_TEST_WORKERS=3")
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	cfg.Print(&b)
	f2, _, _, err := load(t, b.String(), nil)
	if err != nil {
		t.Fatalf("loading Print's output: %v\n%s", err, b.String())
	}
	if diff := cmp.Diff(*f1, *f2, cmp.AllowUnexported(testFlags{})); diff != "" {
		t.Errorf("settings after a round trip through Print (-before +after):\n%s", diff)
	}
}

func TestSecret(t *testing.T) {
	s := serverconfig.Spec{Binary: "x", Secrets: []string{"login"}}
	for name, want := range map[string]bool{
		"pin": true, "hsm-pin": true, "passphrase": true, "vault-token": true, "client-secret": true, "password": true, "login": true,
		"pin-file": false, "passphrase-env": false, "token-file": false, "key": false, "cert": false, "spinner": false, "listen": false,
	} {
		if got := s.Secret(name); got != want {
			t.Errorf("Secret(%q) = %v, want %v", name, got, want)
		}
	}
}

func TestSpecValidate(t *testing.T) {
	fs, _, _ := newTest()
	if err := testSpec.Validate(fs); err != nil {
		t.Fatalf("Validate of the test spec = %v", err)
	}
	bad := testSpec
	bad.Lists = []string{"peers", "no-such-flag"}
	if err := bad.Validate(fs); err == nil || !strings.Contains(err.Error(), `"no-such-flag"`) {
		t.Errorf("Validate with a Lists entry that is no flag = %v", err)
	}
	bad = testSpec
	bad.Rename = map[string]string{"v": "workers"}
	if err := bad.Validate(fs); err == nil || !strings.Contains(err.Error(), `key "workers"`) {
		t.Errorf("Validate with two flags on one key = %v", err)
	}
	bad = testSpec
	bad.Binary = "Test"
	if err := bad.Validate(fs); err == nil {
		t.Error("Validate accepted an upper-case binary name")
	}
	cf := serverconfig.Register(flag.NewFlagSet("x", flag.ContinueOnError), bad)
	if _, err := cf.Load(fs, nil); err == nil {
		t.Error("Load with a bad spec = nil error")
	}
}

func TestKeysAndEnv(t *testing.T) {
	s := serverconfig.Spec{Binary: "rootkms", Rename: map[string]string{"v": "verbose"}}
	for name, want := range map[string][2]string{
		"raft-advertise": {"raft_advertise", "CAIRN_ROOTKMS_RAFT_ADVERTISE"},
		"v":              {"verbose", "CAIRN_ROOTKMS_VERBOSE"},
		"id":             {"id", "CAIRN_ROOTKMS_ID"},
	} {
		if k, e := s.Key(name), s.Env(name); k != want[0] || e != want[1] {
			t.Errorf("Key, Env(%q) = %q, %q; want %q, %q", name, k, e, want[0], want[1])
		}
	}
	if got := s.ConfigEnv(); got != "CAIRN_ROOTKMS_CONFIG" {
		t.Errorf("ConfigEnv = %q", got)
	}
}

func TestAddressChecks(t *testing.T) {
	for _, tc := range []struct {
		check serverconfig.Check
		name  string
		v     string
		ok    bool
	}{
		{serverconfig.BindAddr, "bind", "127.0.0.1:7101", true},
		{serverconfig.BindAddr, "bind", ":7101", true},
		{serverconfig.BindAddr, "bind", "0.0.0.0:0", true},
		{serverconfig.BindAddr, "bind", "[::]:7101", true},
		{serverconfig.BindAddr, "bind", "127.0.0.1:99999", false},
		{serverconfig.BindAddr, "bind", "127.0.0.1:http", false},
		{serverconfig.BindAddr, "bind", "127.0.0.1", false},
		{serverconfig.BindAddr, "bind", "", false},
		{serverconfig.PeerAddr, "peer", "rootkms-1.cairn.internal:7201", true},
		{serverconfig.PeerAddr, "peer", "10.0.2.11:7301", true},
		{serverconfig.PeerAddr, "peer", "[fd00::1]:7301", true},
		{serverconfig.PeerAddr, "peer", "0.0.0.0:7301", false},
		{serverconfig.PeerAddr, "peer", ":7301", false},
		{serverconfig.PeerAddr, "peer", "[::]:7301", false},
		{serverconfig.PeerAddr, "peer", "host:0", false},
		{serverconfig.PeerAddrList, "list", "a:1, b:2", true},
		{serverconfig.PeerAddrList, "list", "a:1,a:1", false},
		{serverconfig.PeerAddrList, "list", " , ", false},
		{serverconfig.PeerAddrList, "list", "a:1,b", false},
		{serverconfig.Optional(serverconfig.PeerAddrList), "optional list", "", true},
	} {
		if err := tc.check(tc.v); (err == nil) != tc.ok {
			t.Errorf("%s check(%q) = %v, want ok %v", tc.name, tc.v, err, tc.ok)
		}
	}
	for addr, want := range map[string]bool{":1": true, "0.0.0.0:1": true, "[::]:1": true, "127.0.0.1:1": false, "host:1": false, "bad": false} {
		if got := serverconfig.Unspecified(addr); got != want {
			t.Errorf("Unspecified(%q) = %v, want %v", addr, got, want)
		}
	}
}

// TestParse: -h is (nil, nil), a bad flag ErrPrinted, a positional argument
// an error naming it, and a good command line the loaded config.
func TestParse(t *testing.T) {
	newFS := func() (*flag.FlagSet, *serverconfig.Flags) {
		fs := flag.NewFlagSet("demo", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		fs.String("listen", "127.0.0.1:1", "listen address")
		return fs, serverconfig.Register(fs, serverconfig.Spec{Binary: "demo"})
	}
	fs, f := newFS()
	if cfg, err := f.Parse(fs, []string{"-h"}, nil); cfg != nil || err != nil {
		t.Errorf("Parse(-h) = %v, %v; want nil, nil", cfg, err)
	}
	fs, f = newFS()
	if _, err := f.Parse(fs, []string{"--nope"}, nil); !errors.Is(err, serverconfig.ErrPrinted) {
		t.Errorf("Parse(--nope) = %v, want ErrPrinted", err)
	}
	fs, f = newFS()
	if _, err := f.Parse(fs, []string{"stray"}, nil); err == nil || !strings.Contains(err.Error(), "demo: unexpected arguments [stray]") {
		t.Errorf("Parse(stray) = %v, want an error naming the argument", err)
	}
	fs, f = newFS()
	cfg, err := f.Parse(fs, []string{"--listen", "127.0.0.1:2"}, nil)
	if err != nil || cfg == nil || fs.Lookup("listen").Value.String() != "127.0.0.1:2" {
		t.Errorf("Parse(--listen) = %v, %v", cfg, err)
	}
}

// TestKeys: the keys are sorted, secrets found, and a list flag missing
// from Lists (or a Lists entry that is no list) is an error.
func TestKeys(t *testing.T) {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.String("peers", "", "comma-separated peers")
	fs.String("pin", "", "the PIN")
	fs.String("data-dir", "", "data")
	serverconfig.Register(fs, serverconfig.Spec{Binary: "demo"})
	keys, secrets, err := serverconfig.Spec{Binary: "demo", Lists: []string{"peers"}}.Keys(fs)
	if err != nil || !slices.Equal(keys, []string{"data_dir", "peers", "pin"}) || !slices.Equal(secrets, []string{"pin"}) {
		t.Errorf("Keys = %v, %v, %v; want [data_dir peers pin], [pin], nil", keys, secrets, err)
	}
	if _, _, err := (serverconfig.Spec{Binary: "demo"}).Keys(fs); err == nil || !strings.Contains(err.Error(), "--peers") {
		t.Errorf("Keys without peers in Lists = %v, want an error naming --peers", err)
	}
}
