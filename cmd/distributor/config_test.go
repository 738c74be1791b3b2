package main

import (
	"bytes"
	"context"
	"io"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cairnkms/cairn/internal/serverconfig/serverconfigtest"
)

// wantKeys are the distributor's config file keys. A new flag gets a key by
// itself (package serverconfig derives them); this list makes adding one a
// decision: document it, and say whether it is a secret (wantSecrets).
var wantKeys = []string{
	"audit_log", "ca", "ceremony_ttl", "cert", "dev_certs", "key", "listen", "log_format", "manifest", "metrics_listen",
	"name", "officers", "peer_ids", "peers", "pprof", "reflection", "root_key_readers", "state_dir", "trust_domain", "verbose",
}

// wantSecrets are the keys --print-config redacts: none of the
// distributor's settings holds a secret value (key is a path; the root key
// only ever comes from ceremonies and peers).
var wantSecrets []string

func TestEveryFlagHasAConfigKey(t *testing.T) {
	fs, _, _ := newFlagSet(io.Discard)
	serverconfigtest.RequireKeys(t, configSpec, fs, wantKeys, wantSecrets)
}

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	return serverconfigtest.WriteFile(t, "distributor.yaml", body)
}

// TestExampleConfigs loads every distributor example of deploy/config
// through the code the binary runs: three distributors, each peering with
// the other two and never with itself.
func TestExampleConfigs(t *testing.T) {
	files, err := filepath.Glob("../../deploy/config/distributor-*.yaml")
	if err != nil || len(files) != 3 {
		t.Fatalf("deploy/config/distributor-*.yaml = %v, %v; want 3 files", files, err)
	}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			s, cfg, _, err := load([]string{"--config", file}, nil, io.Discard)
			if err != nil {
				t.Fatal(err)
			}
			if err := s.check(); err != nil {
				t.Error(err)
			}
			peers := strings.Split(s.peers, ",")
			if len(peers) != 2 {
				t.Errorf("peers = %q, want the other two distributors", s.peers)
			}
			host := strings.TrimSuffix(filepath.Base(file), ".yaml") // distributor-N
			for _, p := range peers {
				if strings.HasPrefix(p, "dist-"+strings.TrimPrefix(host, "distributor-")+".") {
					t.Errorf("%s peers with itself (%s)", host, p)
				}
			}
			if err := cfg.Print(io.Discard); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestConfigRefusals(t *testing.T) {
	tests := []struct {
		name, file string
		args, env  []string
		want       string
	}{
		{"unknown key", "state_dir: /x\npeer: [a.example:7101]\n", nil, nil, `:2: unknown key "peer" (did you mean "peers"?)`},
		{"bad value", "listen: \"127.0.0.1:99999\"\n", nil, nil, `:1: listen: "127.0.0.1:99999" is not a host:port (port 99999 is not in 0-65535)`},
		{"peer bound everywhere", "peers: [\"0.0.0.0:7101\"]\n", nil, nil, `:1: peers: "0.0.0.0:7101" lists "0.0.0.0:7101", which is not an address others can reach`},
		{"bad duration", "ceremony_ttl: 30\n", nil, nil, `:1: ceremony_ttl: 30: want a duration with its unit`},
		{"bad env", "", nil, []string{"CAIRN_DISTRIBUTOR_PEERS=a.example"}, `distributor: CAIRN_DISTRIBUTOR_PEERS: "a.example" lists "a.example", which is not a host:port`},
		{"unknown env", "", nil, []string{"CAIRN_DISTRIBUTOR_STATEDIR=/x"}, `distributor: unknown environment variable CAIRN_DISTRIBUTOR_STATEDIR (did you mean "CAIRN_DISTRIBUTOR_STATE_DIR"?)`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := tt.args
			prefix := "distributor"
			if tt.file != "" {
				file := writeConfig(t, tt.file)
				args = append([]string{"--config", file}, args...)
				prefix = "distributor config " + file
			}
			var stdout, stderr bytes.Buffer
			code := runWith(context.Background(), args, tt.env, &stdout, &stderr)
			if code != 2 || !strings.HasPrefix(stderr.String(), prefix) || !strings.Contains(stderr.String(), tt.want) {
				t.Errorf("distributor %q (env %q) = %d, %q; want 2, starting %q, containing %q", args, tt.env, code, stderr.String(), prefix, tt.want)
			}
		})
	}
}

// TestPrecedence: a flag beats the environment, which beats the file, which
// beats the default, and --print-config says which won.
func TestPrecedence(t *testing.T) {
	file := writeConfig(t, "listen: \"127.0.0.1:7001\"\nstate_dir: /from/file\naudit_log: /from/file/audit.log\nceremony_ttl: 10m\n")
	env := []string{"CAIRN_DISTRIBUTOR_LISTEN=127.0.0.1:7002", "CAIRN_DISTRIBUTOR_STATE_DIR=/from/env"}
	s, _, _, err := load([]string{"--config", file, "--listen", "127.0.0.1:7003"}, env, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if s.listen != "127.0.0.1:7003" || s.stateDir != "/from/env" || s.auditPath != "/from/file/audit.log" || s.ceremonyTTL.String() != "10m0s" || s.officers != "officer/global/*" {
		t.Errorf("listen %q state_dir %q audit_log %q ceremony_ttl %v officers %q; want flag, env, file, file, default",
			s.listen, s.stateDir, s.auditPath, s.ceremonyTTL, s.officers)
	}
	var stdout, stderr bytes.Buffer
	if code := runWith(context.Background(), []string{"--config", file, "--listen", "127.0.0.1:7003", "--print-config"}, env, &stdout, &stderr); code != 0 {
		t.Fatalf("--print-config = %d, %s", code, stderr.String())
	}
	for _, line := range []string{
		`listen: "127.0.0.1:7003"  # --listen`,
		`state_dir: "/from/env"  # CAIRN_DISTRIBUTOR_STATE_DIR`,
		`audit_log: "/from/file/audit.log"  # file, line 3`,
		`officers: ["officer/global/*"]  # default`,
	} {
		if !slices.Contains(strings.Split(stdout.String(), "\n"), line) {
			t.Errorf("--print-config lacks the line %q:\n%s", line, stdout.String())
		}
	}
}

// --print-config works before the required settings are there: it is how
// an operator finds out what is missing.
func TestPrintConfigWithoutRequired(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := runWith(context.Background(), []string{"--print-config"}, nil, &stdout, &stderr); code != 0 || !strings.Contains(stdout.String(), `state_dir: ""  # default`) {
		t.Errorf("distributor --print-config = %d, %q, %q", code, stdout.String(), stderr.String())
	}
}
