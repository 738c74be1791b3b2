package cli_test

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	"github.com/cairnkms/cairn/regionctl/cli"
)

// TestProbe runs regionctl probe against real KMS servers: every server
// decrypts the golden ciphertext of every version it should; a server whose
// bundle lacks a version the record says decrypts fails, named with the
// keyset and version, and so does an unreachable one (exit 1).
func TestProbe(t *testing.T) {
	e := newFleetEnv(t, map[string]int{"us-east": 2, "eu-west": 1})
	e.push("us-east")
	e.push("eu-west")
	v1 := e.record().GetVersions()[0].GetKeyId()
	east1, east2, west := e.kms["us-east"][0], e.kms["us-east"][1], e.kms["eu-west"][0]

	r := e.mustRC("probe")
	contains(t, "probe stdout", r.stdout, "region eu-west: 1 golden ciphertext(s)", "region us-east: 1 golden ciphertext(s)")
	for _, k := range []*fleetKMS{east1, east2, west} {
		if re := regexp.QuoteMeta(k.addr) + `\s+ok\s+1/1\n`; !regexp.MustCompile(re).MatchString(r.stdout) {
			t.Errorf("probe stdout = %q, want a line matching %s", r.stdout, re)
		}
	}
	if strings.Contains(r.stdout, "failed") || strings.Contains(r.stdout, "not probed") {
		t.Errorf("probe stdout = %q, want no failure and every version probed", r.stdout)
	}

	// A version added and pushed to one server of us-east only: the other
	// server, and eu-west's, serve bundles whose copies lack it.
	r = e.mustRC("keyset", "rotate", fleetKeyset)
	v2 := e.record().GetVersions()[1].GetKeyId()
	out := filepath.Join(e.dir, "us-east-v2.bundle")
	e.mustRC("bundle", "build", "--region", "us-east", "--out", out)
	e.mustRC("bundle", "push", "--bundle", out, "--kms", east1.addr)
	r = e.rc("probe")
	if r.code != 1 {
		t.Fatalf("probe with version %d missing on two servers = %d, want 1\n%s%s", v2, r.code, r.stdout, r.stderr)
	}
	if re := regexp.QuoteMeta(east1.addr) + `\s+ok\s+2/2\n`; !regexp.MustCompile(re).MatchString(r.stdout) {
		t.Errorf("probe stdout = %q, want a line matching %s", r.stdout, re)
	}
	for _, k := range []*fleetKMS{east2, west} {
		if re := regexp.QuoteMeta(k.addr) + `\s+FAILED\s+1/2\n`; !regexp.MustCompile(re).MatchString(r.stdout) {
			t.Errorf("probe stdout = %q, want a line matching %s", r.stdout, re)
		}
		contains(t, "probe stdout", r.stdout, fmt.Sprintf("failed: %s: keyset %s version %d: not served", k.addr, fleetKeyset, v2))
	}
	contains(t, "probe stderr", r.stderr, "golden probes failed on 2 of 3 server(s)", "us-east/"+east2.addr, "eu-west/"+west.addr)
	if strings.Contains(r.stdout, fmt.Sprintf("version %d: ", v1)) {
		t.Errorf("probe stdout = %q, want version %d passing everywhere", r.stdout, v1)
	}

	// --region, --json.
	r = e.rc("probe", "--region", "us-east", "--json")
	if r.code != 1 {
		t.Fatalf("probe --region us-east --json = %d, want 1\n%s%s", r.code, r.stdout, r.stderr)
	}
	var report []struct {
		Region  string `json:"region"`
		Probes  int    `json:"probes"`
		Servers []struct {
			Address, ID string
			Probes      int
			Passed      int
			Failures    []struct {
				Keyset string `json:"keyset"`
				KeyID  uint32 `json:"key_id"`
				Detail string `json:"detail"`
			}
		} `json:"servers"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &report); err != nil {
		t.Fatalf("probe --json is not JSON: %v\n%s", err, r.stdout)
	}
	if len(report) != 1 || report[0].Region != "us-east" || report[0].Probes != 2 || len(report[0].Servers) != 2 {
		t.Fatalf("probe --json = %+v, want us-east: 2 probes, 2 servers", report)
	}
	for _, s := range report[0].Servers {
		wantFail := s.Address == east2.addr
		if !strings.HasPrefix(s.ID, "spiffe://cairn.test/kms/us-east/") || (len(s.Failures) > 0) != wantFail {
			t.Errorf("probe --json server %+v: want its SPIFFE ID, failed %t", s, wantFail)
		}
		if wantFail && (len(s.Failures) != 1 || s.Failures[0].Keyset != fleetKeyset || s.Failures[0].KeyID != v2 || s.Passed != 1) {
			t.Errorf("probe --json %s failures = %+v, passed %d; want %s version %d only", s.Address, s.Failures, s.Passed, fleetKeyset, v2)
		}
	}

	// Everything pushed: all pass again. Then an unreachable server fails.
	e.push("us-east")
	e.push("eu-west")
	e.mustRC("probe")
	west.Stop()
	r = e.rc("probe", "--timeout", "5s")
	if r.code != 1 || !regexp.MustCompile(regexp.QuoteMeta(west.addr)+`\s+FAILED\s+0/2\n`).MatchString(r.stdout) ||
		!strings.Contains(r.stdout, "failed: "+west.addr+": probe failed:") {
		t.Errorf("probe with %s stopped = %d, %q; want 1 and the server failed", west.addr, r.code, r.stdout)
	}
}

// TestProbeTamperedGolden: the gate a rollout runs (probeServers) fails a
// server on a golden ciphertext it cannot decrypt, or that decrypts to
// another plaintext, naming the keyset and version; the record's own
// golden ciphertexts pass.
func TestProbeTamperedGolden(t *testing.T) {
	e := newFleetEnv(t, map[string]int{"us-east": 2})
	e.push("us-east")
	rec := e.record()
	id := rec.GetVersions()[0].GetKeyId()
	src := e.pki.Source(regionctlID)
	servers := map[string][]string{"us-east": {e.kms["us-east"][0].addr, e.kms["us-east"][1].addr}}
	probe := func(rec *statev1.KeysetRecord) map[string][]string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		got, err := cli.ProbeRecords(ctx, src, servers, []*statev1.KeysetRecord{rec}, 10*time.Second)
		if err != nil {
			t.Fatalf("probeServers = %v", err)
		}
		return got
	}
	if got := probe(rec); len(got) != 0 {
		t.Fatalf("probeServers(the record) = %v, want no failure", got)
	}
	for _, tt := range []struct {
		name   string
		tamper func(*statev1.GoldenCiphertext)
		want   string
	}{
		{"ciphertext", func(g *statev1.GoldenCiphertext) { g.Ciphertext[len(g.Ciphertext)-1] ^= 1 }, "did not decrypt"},
		// Not the golden form any more: the KMS refuses to decrypt it.
		{"associated data", func(g *statev1.GoldenCiphertext) { g.AssociatedData = append(g.AssociatedData, 'x') }, "not a golden probe"},
		{"plaintext hash", func(g *statev1.GoldenCiphertext) { g.PlaintextSha256[0] ^= 1 }, "SHA-256 does not match"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			bad := proto.CloneOf(rec)
			tt.tamper(bad.GetVersions()[0].GetGolden())
			got := probe(bad)
			for _, addr := range servers["us-east"] {
				want := fmt.Sprintf("keyset %s version %d: ", fleetKeyset, id)
				if len(got[addr]) != 1 || !strings.HasPrefix(got[addr][0], want) || !strings.Contains(got[addr][0], tt.want) {
					t.Errorf("probeServers(golden %s tampered)[%s] = %q, want one failure %q…%q", tt.name, addr, got[addr], want, tt.want)
				}
			}
		})
	}
}
