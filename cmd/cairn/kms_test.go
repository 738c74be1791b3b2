package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/cmd/cairn/chain"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// TestKMSCommandLine covers what cairn kms decides before it calls anything:
// usage errors, and a missing or unusable chain named clearly. (The commands
// against a running chain are exercised by tests/, which starts one.)
func TestKMSCommandLine(t *testing.T) {
	noChain := t.TempDir()
	other := t.TempDir()
	if err := os.WriteFile(filepath.Join(other, "chain.json"), []byte(`{"version":1,"trust_domain":"cairn.local","ca":"/x","regions":[{"name":"us-east","kms":["127.0.0.1:1"],"keysets":["cairn-kms://us-east/demo/notes"]}]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantStderr string
	}{
		{"no command", []string{"kms"}, exitUsage, "Usage: cairn kms"},
		{"unknown command", []string{"kms", "rotate"}, exitUsage, `unknown command "rotate"`},
		{"two arguments", []string{"kms", "encrypt", "a", "b"}, exitUsage, "unexpected arguments"},
		{"bad flag", []string{"kms", "status", "--frobnicate"}, exitUsage, "flag provided but not defined"},
		{"no chain", []string{"kms", "encrypt", "--chain", noChain, "x"}, exitError, "make up"},
		{"status without a chain", []string{"kms", "status", "--chain", noChain}, exitError, "make up"},
		{"bad key URI", []string{"kms", "encrypt", "--chain", other, "--key", "gcp-kms://x/y", "x"}, exitError, "invalid key URI"},
		{"region not in the chain", []string{"kms", "decrypt", "--chain", other, "--key", "cairn-kms://ap-south/demo/notes", "AAAA"}, exitError, `no region "ap-south" (it has us-east)`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, _, stderr := runArgs(t, tt.args...)
			if code != tt.wantCode || !strings.Contains(stderr, tt.wantStderr) {
				t.Errorf("cairn %s = exit %d, stderr %q; want exit %d, stderr containing %q", strings.Join(tt.args, " "), code, stderr, tt.wantCode, tt.wantStderr)
			}
		})
	}
	if code, stdout, _ := runArgs(t, "kms", "-h"); code != exitOK || !strings.Contains(stdout, "standard input") {
		t.Errorf("cairn kms -h = exit %d, %q; want usage on stdout", code, stdout)
	}
}

func TestKeyVersion(t *testing.T) {
	for _, tt := range []struct {
		ct   []byte
		want uint32
	}{
		{[]byte{1, 0x5b, 0x9c, 0x2e, 0xdb, 9, 9}, 0x5b9c2edb},
		{[]byte{0, 0, 0, 0, 7, 9}, 0}, // a LEGACY prefix: not what Cairn serves
		{[]byte{1, 0, 0}, 0},
		{nil, 0},
	} {
		if got := keyVersion(tt.ct); got != tt.want {
			t.Errorf("keyVersion(%x) = %d, want %d", tt.ct, got, tt.want)
		}
	}
}

// TestKMSStatusReport checks what cairn kms status prints from the
// servers' replies, as text and as JSON (the documented field names), and
// the next commands it names.
func TestKMSStatusReport(t *testing.T) {
	used := time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)
	kms1 := chain.Component{Name: "us-east/kms-1", Kind: "kms", Region: "us-east", Address: "127.0.0.1:7131", PID: 11}
	kms2 := chain.Component{Name: "us-east/kms-2", Kind: "kms", Region: "us-east", Address: "127.0.0.1:7132", PID: 12}
	st := &kmsv1.GetStatusResponse{State: kmsv1.ServingState_SERVING_STATE_SERVING, Bundle: &bundlev1.BundleRef{Serial: 3}, KeysetCount: 1,
		Keysets: []*kmsv1.KeysetUsage{{Keyset: "demo/notes", Versions: []*kmsv1.KeyVersionUsage{
			{KeyId: 7, Status: cryptov1.KeyStatus_KEY_STATUS_PRIMARY, EncryptCount: 5, DecryptCount: 2, LastUsed: timestamppb.New(used)},
			{KeyId: 8, Status: cryptov1.KeyStatus_KEY_STATUS_ENABLED},
		}}}}
	servers := []serverStatus{serverStatusOf(kms1, st, nil), serverStatusOf(kms2, nil, errors.New("connection refused"))}
	want := []serverStatus{
		{Name: "us-east/kms-1", Region: "us-east", Address: "127.0.0.1:7131", PID: 11, State: "SERVING", BundleSerial: 3, Keysets: 1, Versions: []versionStatus{
			{Keyset: "demo/notes", KeyID: 7, Status: "PRIMARY", Encrypts: 5, Decrypts: 2, LastUsed: used},
			{Keyset: "demo/notes", KeyID: 8, Status: "ENABLED"},
		}},
		{Name: "us-east/kms-2", Region: "us-east", Address: "127.0.0.1:7132", PID: 12, State: "UNREACHABLE", Error: "connection refused", Versions: []versionStatus{}},
	}
	if diff := cmp.Diff(want, servers); diff != "" {
		t.Errorf("serverStatusOf mismatch (-want +got):\n%s", diff)
	}

	for _, tt := range []struct {
		name     string
		servers  []serverStatus
		chainDir string
		running  bool
		want     []nextCommand
	}{
		{"all serving", servers[:1], ".state/up", true, []nextCommand{}},
		{"one unreachable", servers, ".state/up", true, []nextCommand{{Why: "us-east/kms-2 is unreachable: restart it in the running chain", Command: "cairn up restart us-east/kms-2"}}},
		{"another chain", servers, ".state/other", true, []nextCommand{{Why: "us-east/kms-2 is unreachable: restart it in the running chain", Command: "cairn up restart --state-dir .state/other us-east/kms-2"}}},
		{"launcher gone", servers, ".state/up", false, []nextCommand{{Why: "the chain's launcher (cairn up) is not running: start the chain again", Command: "make up"}}},
		{"launcher of another chain gone", servers, ".state/other", false, []nextCommand{{Why: "the chain's launcher (cairn up) is not running: start the chain again", Command: "cairn up --state-dir .state/other"}}},
	} {
		if diff := cmp.Diff(tt.want, statusNext(tt.servers, tt.chainDir, tt.running)); diff != "" {
			t.Errorf("statusNext(%s) mismatch (-want +got):\n%s", tt.name, diff)
		}
	}

	r := statusReport{Chain: "/x/.state/up", Servers: servers, Unreachable: 1, Next: statusNext(servers, ".state/up", true)}
	var text bytes.Buffer
	if err := r.printText(&text); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"us-east/kms-1  127.0.0.1:7131  SERVING      serial 3  1",
		"us-east/kms-2  127.0.0.1:7132  UNREACHABLE  -         -        connection refused",
		"us-east/kms-1  demo/notes  7            PRIMARY  5         2         2026-03-04T05:06:07Z",
		"next: us-east/kms-2 is unreachable: restart it in the running chain\n  cairn up restart us-east/kms-2\n",
	} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("status text does not contain %q:\n%s", want, text.String())
		}
	}
	if strings.Contains(text.String(), "ENABLED") {
		t.Errorf("status text lists an unused version:\n%s", text.String())
	}

	js, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal(js, &got); err != nil {
		t.Fatal(err)
	}
	srv := got["servers"].([]any)
	s0, s1 := srv[0].(map[string]any), srv[1].(map[string]any)
	v0 := s0["versions"].([]any)[0].(map[string]any)
	nx := got["next"].([]any)[0].(map[string]any)
	for _, c := range []struct {
		field     string
		got, want any
	}{
		{"chain", got["chain"], "/x/.state/up"},
		{"unreachable", got["unreachable"], float64(1)},
		{"servers[0].name", s0["name"], "us-east/kms-1"},
		{"servers[0].region", s0["region"], "us-east"},
		{"servers[0].address", s0["address"], "127.0.0.1:7131"},
		{"servers[0].pid", s0["pid"], float64(11)},
		{"servers[0].state", s0["state"], "SERVING"},
		{"servers[0].bundle_serial", s0["bundle_serial"], float64(3)},
		{"servers[0].keysets", s0["keysets"], float64(1)},
		{"servers[0].versions[0].keyset", v0["keyset"], "demo/notes"},
		{"servers[0].versions[0].key_id", v0["key_id"], float64(7)},
		{"servers[0].versions[0].status", v0["status"], "PRIMARY"},
		{"servers[0].versions[0].encrypts", v0["encrypts"], float64(5)},
		{"servers[0].versions[0].decrypts", v0["decrypts"], float64(2)},
		{"servers[0].versions[0].last_used", v0["last_used"], "2026-03-04T05:06:07Z"},
		{"servers[1].state", s1["state"], "UNREACHABLE"},
		{"servers[1].error", s1["error"], "connection refused"},
		{"next[0].why", nx["why"], "us-east/kms-2 is unreachable: restart it in the running chain"},
		{"next[0].command", nx["command"], "cairn up restart us-east/kms-2"},
	} {
		if c.got != c.want {
			t.Errorf("JSON %s = %v, want %v\n%s", c.field, c.got, c.want, js)
		}
	}
	if _, ok := s0["error"]; ok {
		t.Errorf("JSON servers[0] has an error field, want none for a server that answered: %s", js)
	}
}
