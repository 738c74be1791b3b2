package cli_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cairnkms/cairn/regionctl/cli"
)

func TestRunUsage(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		args     []string
		code     int
		contains string
	}{
		{nil, 2, "usage: regionctl"},
		{[]string{"help"}, 0, "bundle push"},
		{[]string{"--help"}, 0, "Identity flags"},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{[]string{"bundle"}, 2, "missing verb (build, inspect, push)"},
		{[]string{"bundle", "-h"}, 0, "bundle build"},
		{[]string{"bundle", "sign"}, 2, `unknown verb "sign" (build, inspect, push)`},
		{[]string{"keyset"}, 2, "missing verb (create, destroy, disable, enable, list, promote, rewrap, rotate, set-policy, show, undestroy)"},
		{[]string{"cluster"}, 2, "missing verb (add, remove, snapshot, status)"},
		{[]string{"keys", "generate"}, 2, "--out is required"},
		{[]string{"keys", "generate", "--out", dir, "extra"}, 2, "unexpected arguments: [extra]"},
		{[]string{"keys", "generate", "-h"}, 0, "-out"},
		{[]string{"region", "create"}, 2, "--region is required"},
		{[]string{"region", "create", "--rootkms", "127.0.0.1:1", "--region", "US-EAST"}, 2, "--region"},
		{[]string{"region", "create", "--rootkms", " , ", "--region", "us-east"}, 2, "--rootkms (or rootkms in the config file) is required"},
		{[]string{"region", "create", "--rootkms", "127.0.0.1:1", "--region", "us-east"}, 1, "--trust-domain"},
		{[]string{"region", "retire-key", "--region", "us-east"}, 2, "--region and --version are required"},
		{[]string{"keyset", "create", "--rootkms", "127.0.0.1:1"}, 2, "--rootkms and --teams"},
		{[]string{"keyset", "create", "--rootkms", "127.0.0.1:1", "--teams", dir, "--only", "Bad Name"}, 2, "--only"},
		{[]string{"keyset", "show"}, 2, "the keyset NAME is required"},
		{[]string{"keyset", "show", "a/b", "c/d"}, 2, "unexpected arguments: [c/d]"},
		{[]string{"keyset", "destroy", "a/b", "--version", "3", "--delay", "-1h"}, 2, "--delay must be positive"},
		{[]string{"keyset", "set-policy", "a/b"}, 2, "give a positive --ttl"},
		{[]string{"keyset", "list", "--config", filepath.Join(dir, "missing.json")}, 1, "config file"},
		{[]string{"rotate"}, 2, "--due is required"},
		{[]string{"bundle", "build", "--region", "us-east"}, 2, "--region and --out are required"},
		{[]string{"bundle", "build", "--region", "Nope", "--out", "o"}, 2, "--region"},
		{[]string{"bundle", "build", "--region", "us-east", "--out", "o"}, 2, "--rootkms, --teams and --signing-key"},
		{[]string{"bundle", "build", "--region", "us-east", "--out", "o", "--created-by", "someone"}, 2, "--created-by is gone: a bundle's created_by"},
		{[]string{"bundle", "build", "--region", "us-east", "--serial", "-1", "--out", "o"}, 2, "invalid value"},
		{[]string{"bundle", "inspect", "--bundle", "b"}, 2, "--bundle and --signing-pub"},
		{[]string{"bundle", "inspect", "--bundle", "b", "--signing-pub", filepath.Join(dir, "missing.pub")}, 1, "no such file"},
		{[]string{"bundle", "push", "--kms", "127.0.0.1:1"}, 2, "--bundle is required"},
		{[]string{"bundle", "push", "--kms", "127.0.0.1:1", "--bundle", "b", "--force"}, 2, "--force and --reason are gone from bundle push: a shrink override is signed into the bundle"},
		{[]string{"bundle", "push", "--kms", "127.0.0.1:1", "--bundle", "b", "--reason", "because"}, 2, "regionctl bundle build --force-shrink --reason TEXT"},
		{[]string{"bundle", "push", "--kms", "127.0.0.1:1", "--bundle", "b", "--force", "--reason", "INC-1"}, 2, "--force and --reason are gone from bundle push"},
		{[]string{"bundle", "build", "--region", "us-east", "--out", "o", "--force-shrink"}, 2, "--reason goes with --allow-partial or --force-shrink, and they need it"},
		{[]string{"bundle", "build", "--region", "us-east", "--out", "o", "--allow-partial", "--reason", " "}, 2, "--reason goes with --allow-partial or --force-shrink"},
		{[]string{"bundle", "build", "--region", "us-east", "--out", "o", "--reason", "INC-1"}, 2, "--reason goes with --allow-partial or --force-shrink"},
		{[]string{"bundle", "build", "--region", "us-east", "--out", "o", "--force-shrink", "--reason", "a\nb"}, 2, "--reason: contains a control character"},
		{[]string{"bundle", "push", "--kms", "127.0.0.1:1", "--bundle", filepath.Join(dir, "missing")}, 1, "no such file"},
		{[]string{"status", "--region", "us-east"}, 1, "no KMS servers configured"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			r := run(t, tt.args...)
			if r.code != tt.code || !strings.Contains(r.stdout+r.stderr, tt.contains) {
				t.Errorf("regionctl %v = %d, output %q; want %d containing %q", tt.args, r.code, r.stdout+r.stderr, tt.code, tt.contains)
			}
		})
	}
}

func TestConfigFileIsStrict(t *testing.T) {
	tests := []struct {
		name, data, want string
	}{
		{"unknown key", `{"teams":"t","team":"x"}`, `unknown key "team"`},
		{"mis-cased key", `{"Teams":"t"}`, `unknown key "Teams"`},
		{"repeated key", `{"teams":"a","teams":"b"}`, `key "teams" appears twice`},
		{"unknown identity key", `{"identity":{"dev_certs":"d","nmae":"x"}}`, `unknown key "identity.nmae"`},
		{"both identities", `{"identity":{"dev_certs":"d","cert":"c"}}`, "either dev_certs and name, or cert, key and ca"},
		{"bad window", `{"propagation_window":"soon"}`, "propagation_window"},
		{"bad region", `{"regions":{"US":["a:1"]}}`, `regions: "US"`},
		{"empty region", `{"regions":{"us-east":[]}}`, `"us-east" lists no KMS servers`},
		{"wrong type", `{"rootkms":"a:1"}`, "rootkms"},
		{"trailing data", `{"teams":"t"} {}`, "data after the config object"},
		{"not an object", `[]`, "want a JSON object"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := cli.ParseFile([]byte(tt.data))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("ParseFile(%s) = %v, want an error containing %q", tt.data, err, tt.want)
			}
		})
	}
	f, err := cli.ParseFile([]byte(`{"trust_domain":"cairn.test","identity":{"dev_certs":"certs","name":"regionctl/global/r"},"rootkms":["a:1"],
		"regions":{"us-east":["k:1","k:2"]},"signing_key":"k","signing_pub":"p","signing_pubs":["q"],"teams":"t","propagation_window":"2m"}`))
	if err != nil || f.Regions["us-east"][1] != "k:2" || f.Identity.Name != "regionctl/global/r" {
		t.Errorf("ParseFile(full) = %+v, %v", f, err)
	}
}

// TestFlagsOverrideTheConfigFile: --rootkms wins over the file's rootkms.
func TestFlagsOverrideTheConfigFile(t *testing.T) {
	e := newEnv(t, nil)
	bad := filepath.Join(e.dir, "bad.json")
	data, err := os.ReadFile(e.config)
	if err != nil {
		t.Fatal(err)
	}
	badData := strings.Replace(string(data), e.rootAddr, "127.0.0.1:1", 1)
	if badData == string(data) {
		t.Fatalf("the config file does not name the root KMS %s; the test would not test the flag: %s", e.rootAddr, data)
	}
	writeFile(t, bad, badData)
	mustRun(t, "keyset", "list", "--config", bad, "--rootkms", e.rootAddr)
	t.Setenv(cli.ConfigEnv, e.config)
	r := mustRun(t, "keyset", "list")
	contains(t, "keyset list ($REGIONCTL_CONFIG)", r.stdout, "search/index")
}
