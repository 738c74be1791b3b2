package main

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cairnkms/cairn/internal/serverconfig/serverconfigtest"
	"github.com/google/go-cmp/cmp"
)

// wantKeys are the KMS server's config file keys. A new flag gets a key by
// itself (package serverconfig derives them); this list makes adding one a
// decision: document it, and say whether it is a secret (wantSecrets).
var wantKeys = []string{
	"admins", "admins_file", "audit_log", "audit_sync", "ca", "cert", "dev_certs", "key", "listen", "log_format",
	"max_batch", "max_call_duration", "max_in_flight", "max_payload", "metrics_listen", "mlock", "name", "pprof", "reflection", "region",
	"reload_interval", "rootkms", "signing_key", "state_dir", "transit_listen", "transit_mount", "trust_domain", "verbose",
}

// wantSecrets are the keys --print-config redacts: none of the KMS server's
// settings holds a secret value (key and signing_key are paths; the
// transit API's Vault token is a request header, never a setting).
var wantSecrets []string

func TestEveryFlagHasAConfigKey(t *testing.T) {
	fs, _, _ := newFlagSet(io.Discard)
	serverconfigtest.RequireKeys(t, configSpec, fs, wantKeys, wantSecrets)
}

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	return serverconfigtest.WriteFile(t, "kms.yaml", body)
}

// TestExampleConfigs loads every KMS example of deploy/config through the
// code the binary runs: two regions, two servers each.
func TestExampleConfigs(t *testing.T) {
	files, err := filepath.Glob("../../deploy/config/kms-*.yaml")
	if err != nil || len(files) != 4 {
		t.Fatalf("deploy/config/kms-*.yaml = %v, %v; want 4 files", files, err)
	}
	regions := map[string]int{}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			s, cfg, _, err := load([]string{"--config", file}, nil, io.Discard)
			if err != nil {
				t.Fatal(err)
			}
			if err := s.c.required(); err != nil {
				t.Error(err)
			}
			if !strings.HasPrefix(filepath.Base(file), "kms-"+s.c.region+"-") {
				t.Errorf("region %q in a file named %s", s.c.region, filepath.Base(file))
			}
			regions[s.c.region]++
			if err := cfg.Print(io.Discard); err != nil {
				t.Fatal(err)
			}
		})
	}
	if diff := cmp.Diff(map[string]int{"us-east": 2, "eu-west": 2}, regions); diff != "" {
		t.Errorf("servers per region (-want +got):\n%s", diff)
	}
}

// TestDeployConfigHoldsOnlyServerConfigs: every file of deploy/config is
// loaded by one of the three binaries' TestExampleConfigs.
func TestDeployConfigHoldsOnlyServerConfigs(t *testing.T) {
	entries, err := os.ReadDir("../../deploy/config")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		n := e.Name()
		if n == "README.md" {
			continue
		}
		if e.IsDir() || !strings.HasSuffix(n, ".yaml") ||
			!(strings.HasPrefix(n, "distributor-") || strings.HasPrefix(n, "rootkms-") || strings.HasPrefix(n, "kms-")) {
			t.Errorf("deploy/config/%s is no <distributor|rootkms|kms>-*.yaml: no test would load it", n)
		}
	}
}

func TestConfigRefusals(t *testing.T) {
	tests := []struct {
		name, file string
		args, env  []string
		want       string
	}{
		{"unknown key", "region: us-east\nsigning_keys: [/k.pub]\n", nil, nil, `:2: unknown key "signing_keys" (did you mean "signing_key"?)`},
		{"bad listen", "listen: \"127.0.0.1:99999\"\n", nil, nil, `:1: listen: "127.0.0.1:99999" is not a host:port (port 99999 is not in 0-65535)`},
		{"bad region", "region: US-East\n", nil, nil, `:1: region: "US-East" is not a region name`},
		{"negative", "max_batch: -5\n", nil, nil, `:1: max_batch: "-5" must not be negative`},
		{"admins and admins_file", "admins_file: /etc/cairn/admins.txt\n", []string{"--admins", "regionctl/*/*"}, nil, `kms: --admins and admins_file (`},
		{"admins in env, admins_file in file", "admins_file: /etc/cairn/admins.txt\n", nil, []string{"CAIRN_KMS_ADMINS=regionctl/*/*"}, `kms: CAIRN_KMS_ADMINS and admins_file (`},
		{"bad env", "", nil, []string{"CAIRN_KMS_MAX_IN_FLIGHT=lots"}, `kms: CAIRN_KMS_MAX_IN_FLIGHT: "lots" is not an integer`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := tt.args
			prefix := "kms"
			if tt.file != "" {
				file := writeConfig(t, tt.file)
				args = append([]string{"--config", file}, args...)
				if !strings.HasPrefix(tt.want, "kms") {
					prefix = "kms config " + file
				}
			}
			var stdout, stderr bytes.Buffer
			code := runWith(context.Background(), args, tt.env, &stdout, &stderr)
			if code != 2 || !strings.HasPrefix(stderr.String(), prefix) || !strings.Contains(stderr.String(), tt.want) {
				t.Errorf("kms %q (env %q) = %d, %q; want 2, starting %q, containing %q", args, tt.env, code, stderr.String(), prefix, tt.want)
			}
		})
	}
}

// TestConfigFileServes starts the server from a config file, an
// environment variable and one flag (the same settings
// TestRunServesUntilCanceled gives as flags), and sees it serve its ops
// listener.
func TestConfigFileServes(t *testing.T) {
	certs, pub := fixture(t)
	metricsAddr := freeAddr(t)
	file := writeConfig(t, "trust_domain: cairn.test\ndev_certs: "+certs+"\nname: kms/us-east/kms-1\nregion: us-east\n"+
		"state_dir: "+t.TempDir()+"\nrootkms: [\"127.0.0.1:1\"]\nsigning_key: ["+pub+"]\nlisten: \"127.0.0.1:0\"\nlog_format: json\n")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out syncBuffer
	done := make(chan int)
	go func() {
		done <- runWith(ctx, []string{"--config", file, "--mlock", "off"}, []string{"CAIRN_KMS_METRICS_LISTEN=" + metricsAddr}, io.Discard, &out)
	}()
	waitHTTP(t, "http://"+metricsAddr+"/healthz", &out)
	cancel()
	if code := <-done; code != 0 {
		t.Errorf("run after cancel = %d, want 0\n%s", code, out.String())
	}
	if !strings.Contains(out.String(), `"msg":"kms: config file applied"`) {
		t.Errorf("the log does not say which config file was applied:\n%s", out.String())
	}
}

func TestPrintConfig(t *testing.T) {
	file := writeConfig(t, "region: eu-west\nsigning_key: [/etc/cairn/a.pub, /etc/cairn/b.pub]\nkey: /etc/cairn/tls/key.pem\n")
	var stdout, stderr bytes.Buffer
	code := runWith(context.Background(), []string{"--config", file, "--print-config", "--max-batch", "10"},
		[]string{"CAIRN_KMS_TRANSIT_LISTEN=127.0.0.1:8200"}, &stdout, &stderr)
	if code != 0 || stderr.Len() != 0 {
		t.Fatalf("kms --print-config = %d, stderr %q; want 0 and nothing", code, stderr.String())
	}
	want := []string{
		"# kms: effective settings; flags > environment (CAIRN_KMS_*) > config file " + file + " > defaults",
		`admins: ["regionctl/*/*"]  # default`,
		`key: "/etc/cairn/tls/key.pem"  # file, line 3`,
		`max_batch: 10  # --max-batch`,
		`region: "eu-west"  # file, line 1`,
		`signing_key: ["/etc/cairn/a.pub","/etc/cairn/b.pub"]  # file, line 2`,
		`transit_listen: "127.0.0.1:8200"  # CAIRN_KMS_TRANSIT_LISTEN`,
	}
	lines := strings.Split(stdout.String(), "\n")
	for _, line := range want {
		if !slices.Contains(lines, line) {
			t.Errorf("--print-config lacks the line %q:\n%s", line, stdout.String())
		}
	}
	if strings.Contains(stdout.String(), "<redacted>") {
		t.Errorf("--print-config redacted a setting that is no secret:\n%s", stdout.String())
	}
}

// waitHTTP polls url until it answers 200 (the server starts in the
// background), failing the test with the server's log after 10 s.
func waitHTTP(t *testing.T, url string, log *syncBuffer) {
	t.Helper()
	client := &http.Client{Timeout: time.Second}
	defer client.CloseIdleConnections()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		resp, err := client.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s never answered 200: %v\n%s", url, err, log.String())
		}
	}
}
