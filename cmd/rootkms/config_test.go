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

// wantKeys are the root KMS's config file keys. A new flag gets a key by
// itself (package serverconfig derives them); this list makes adding one a
// decision: document it, and say whether it is a secret (wantSecrets).
var wantKeys = []string{
	"api_advertise", "apply_timeout", "audit_log", "bootstrap", "ca", "cert", "data_dir", "dev_certs", "distributors",
	"election_timeout", "heartbeat_timeout", "id", "join", "key", "leader_lease_timeout", "listen", "log_format",
	"manifest", "max_clock_skew", "metrics_listen", "mlock", "name", "non_voter", "officers", "operators", "pprof", "raft_advertise",
	"raft_listen", "reflection", "regionctl", "safety_window", "trust_domain", "verbose",
}

// wantSecrets are the keys --print-config redacts: none of the root KMS's
// settings holds a secret value (key is a path).
var wantSecrets []string

func TestEveryFlagHasAConfigKey(t *testing.T) {
	fs, _, _ := newFlagSet(io.Discard)
	serverconfigtest.RequireKeys(t, configSpec, fs, wantKeys, wantSecrets)
}

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	return serverconfigtest.WriteFile(t, "rootkms.yaml", body)
}

// TestExampleConfigs loads every root KMS example of deploy/config through
// the code the binary runs, and checks that it has what a replica needs.
func TestExampleConfigs(t *testing.T) {
	files, err := filepath.Glob("../../deploy/config/rootkms-*.yaml")
	if err != nil || len(files) != 4 {
		t.Fatalf("deploy/config/rootkms-*.yaml = %v, %v; want 4 files (3 voters, 1 non-voter)", files, err)
	}
	ids := map[string]bool{}
	voters := 0
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			s, cfg, _, err := load([]string{"--config", file}, nil, io.Discard)
			if err != nil {
				t.Fatal(err)
			}
			if err := s.check(); err != nil {
				t.Error(err)
			}
			if s.apiAdvertise == "" || s.raftAdvertise == "" {
				t.Errorf("api_advertise %q, raft_advertise %q: a multi-host example advertises both", s.apiAdvertise, s.raftAdvertise)
			}
			if s.bootstrap {
				t.Error("bootstrap in a config file: a restart on a lost data dir would found a second cluster; give --bootstrap once on the command line")
			}
			if ids[s.replicaID] {
				t.Errorf("id %q used twice", s.replicaID)
			}
			ids[s.replicaID] = true
			if !s.nonVoter {
				voters++
			}
			var out bytes.Buffer
			if err := cfg.Print(&out); err != nil {
				t.Fatal(err)
			}
		})
	}
	if voters != 3 {
		t.Errorf("%d voters among the examples, want 3", voters)
	}
}

func TestConfigFile(t *testing.T) {
	file := writeConfig(t, "id: rootkms-2\nlisten: \"0.0.0.0:7201\"\napi_advertise: rootkms-2.example:7201\nraft_listen: \"0.0.0.0:7301\"\nraft_advertise: \"10.0.0.2:7301\"\ndistributors: [d1.example:7101, d2.example:7101]\nmlock: \"off\"\n")
	env := []string{"CAIRN_ROOTKMS_DATA_DIR=/var/lib/env", "CAIRN_ROOTKMS_ID=from-env"}
	s, _, _, err := load([]string{"--config", file, "--id", "rootkms-9"}, env, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if s.replicaID != "rootkms-9" || s.dataDir != "/var/lib/env" || s.raftAdvertise != "10.0.0.2:7301" || s.apiAdvertise != "rootkms-2.example:7201" ||
		s.distributors != "d1.example:7101,d2.example:7101" || string(*s.mlock) != "off" {
		t.Errorf("settings = id %q data_dir %q raft_advertise %q api_advertise %q distributors %q mlock %q; want the flag's id, the env's data_dir, the rest from the file",
			s.replicaID, s.dataDir, s.raftAdvertise, s.apiAdvertise, s.distributors, *s.mlock)
	}
}

func TestConfigRefusals(t *testing.T) {
	tests := []struct {
		name, file string
		args, env  []string
		want       string
	}{
		{"unknown key", "id: r1\nraft_advertize: \"10.0.0.1:7301\"\n", nil, nil, `:2: unknown key "raft_advertize" (did you mean "raft_advertise"?)`},
		{"bad value", "raft_listen: \"127.0.0.1:99999\"\n", nil, nil, `:1: raft_listen: "127.0.0.1:99999" is not a host:port (port 99999 is not in 0-65535)`},
		{"unspecified advertise", "raft_advertise: \"0.0.0.0:7301\"\n", nil, nil, `:1: raft_advertise: "0.0.0.0:7301" is not an address others can reach`},
		{"raft bound everywhere, nothing advertised", "raft_listen: \"0.0.0.0:7301\"\n", nil, nil, `:1: raft_listen: "0.0.0.0:7301" binds every interface: set raft_advertise`},
		{"API bound everywhere, nothing advertised", "", []string{"--listen", ":7201"}, nil, `rootkms: --listen: ":7201" binds every interface: set api_advertise`},
		{"bootstrap and join", "join: [r1.example:7201]\n", []string{"--bootstrap"}, nil, `rootkms: --bootstrap and join (`},
		{"bad env", "", nil, []string{"CAIRN_ROOTKMS_HEARTBEAT_TIMEOUT=fast"}, `rootkms: CAIRN_ROOTKMS_HEARTBEAT_TIMEOUT: "fast" is not a duration`},
		{"bad mlock", "mlock: maybe\n", nil, nil, `:1: mlock: "maybe" is refused: lockedmem: --mlock "maybe": want auto, on or off`},
		{"positional argument", "", []string{"extra"}, nil, "rootkms: unexpected arguments [extra]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := tt.args
			prefix := "rootkms"
			if tt.file != "" {
				file := writeConfig(t, tt.file)
				args = append([]string{"--config", file}, args...)
				if !strings.HasPrefix(tt.want, "rootkms") {
					prefix = "rootkms config " + file
				}
			}
			var stdout, stderr bytes.Buffer
			code := runWith(context.Background(), args, tt.env, &stdout, &stderr)
			if code != 2 || !strings.HasPrefix(stderr.String(), prefix) || !strings.Contains(stderr.String(), tt.want) {
				t.Errorf("rootkms %q (env %q) = %d, %q; want 2, starting %q, containing %q", args, tt.env, code, stderr.String(), prefix, tt.want)
			}
		})
	}
}

func TestPrintConfig(t *testing.T) {
	file := writeConfig(t, "id: rootkms-1\nraft_listen: \"0.0.0.0:7301\"\nraft_advertise: \"10.0.0.1:7301\"\nkey: /etc/cairn/tls/key.pem\n")
	var stdout, stderr bytes.Buffer
	code := runWith(context.Background(), []string{"--config", file, "--print-config", "--api-advertise", "r1.example:7201"},
		[]string{"CAIRN_ROOTKMS_VERBOSE=true"}, &stdout, &stderr)
	if code != 0 || stderr.Len() != 0 {
		t.Fatalf("rootkms --print-config = %d, stderr %q; want 0 and nothing", code, stderr.String())
	}
	for _, line := range []string{
		"# rootkms: effective settings; flags > environment (CAIRN_ROOTKMS_*) > config file " + file + " > defaults",
		`api_advertise: "r1.example:7201"  # --api-advertise`,
		`id: "rootkms-1"  # file, line 1`,
		`key: "/etc/cairn/tls/key.pem"  # file, line 4`,
		`raft_advertise: "10.0.0.1:7301"  # file, line 3`,
		`listen: "127.0.0.1:7201"  # default`,
		`distributors: []  # default`,
		`mlock: "auto"  # default`,
		`verbose: true  # CAIRN_ROOTKMS_VERBOSE`,
	} {
		if !slices.Contains(strings.Split(stdout.String(), "\n"), line) {
			t.Errorf("--print-config lacks the line %q:\n%s", line, stdout.String())
		}
	}
	if n := strings.Count(stdout.String(), "\n"); n != len(wantKeys)+1 {
		t.Errorf("--print-config printed %d lines, want a header and one per key (%d):\n%s", n, len(wantKeys)+1, stdout.String())
	}
	// What it prints is a config file the binary takes.
	again := writeConfig(t, stdout.String())
	stdout.Reset()
	if code := runWith(context.Background(), []string{"--config", again, "--print-config"}, nil, &stdout, &stderr); code != 0 {
		t.Errorf("rootkms --config <its --print-config> --print-config = %d, %s", code, stderr.String())
	}
	if !strings.Contains(stdout.String(), `api_advertise: "r1.example:7201"  # file, line`) {
		t.Errorf("the printed config, loaded again, lost api_advertise:\n%s", stdout.String())
	}
}
