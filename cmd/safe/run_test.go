package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/identity"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	"github.com/cairnkms/cairn/safe"
)

func TestRunUsage(t *testing.T) {
	tests := []struct {
		args     []string
		code     int
		contains string
	}{
		{nil, 2, "Usage: safe <command>"},
		{[]string{"help"}, 0, "Commands:"},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{[]string{"genesis"}, 2, "--threshold, --safe (N times) and --manifest are required"},
		{[]string{"genesis", "--threshold", "2", "--pin", "1234"}, 2, "flag provided but not defined: -pin"},
		{[]string{"release", "--ceremony", "x"}, 2, "--distributor, --ceremony, --safe and --manifest are required"},
		{[]string{"ceremony"}, 2, "Usage: safe ceremony open|status|cancel"},
		{[]string{"ceremony", "unseal"}, 2, `unknown verb "unseal" (open, status, cancel)`},
		{[]string{"ceremony", "open"}, 2, "--distributor is required"},
		{[]string{"ceremony", "open", "--ceremony", "x"}, 2, "flag provided but not defined: -ceremony"},
		{[]string{"ceremony", "cancel", "--distributor", "127.0.0.1:1"}, 2, "--ceremony is required"},
		{[]string{"ceremony", "status", "--distributor", "127.0.0.1:1", "extra"}, 2, "unexpected arguments: [extra]"},
		{[]string{"rekey"}, 2, "--distributor, --threshold, --safe, --manifest and --out are required"},
		{[]string{"seal", "--distributor", "127.0.0.1:1"}, 2, "--distributor and --reason are required"},
		{[]string{"seal", "--distributor", "127.0.0.1:1", "--reason", "x", "--rootkms", "127.0.0.1:2"}, 2, "--rootkms needs --fleet"},
		{[]string{"manifest"}, 2, `want "install"`},
		{[]string{"manifest", "install"}, 2, "--distributor and --manifest are required"},
		{[]string{"retire", "--safe", "x"}, 2, "--safe, --manifest and --distributor are required"},
		{[]string{"drill"}, 2, "--manifest and --safe are required"},
		{[]string{"list"}, 2, "--safe is required"},
		{[]string{"list", "--safe", "/nonexistent/safe.json"}, 1, "no such file"},
		{[]string{"drill", "--manifest", "/nonexistent.json", "--safe", "x"}, 1, "reading manifest"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			var out, errb bytes.Buffer
			code := run(context.Background(), tt.args, &out, &errb)
			if code != tt.code || !strings.Contains(out.String()+errb.String(), tt.contains) {
				t.Errorf("safe %v = %d, output %q; want %d containing %q", tt.args, code, out.String()+errb.String(), tt.code, tt.contains)
			}
		})
	}
}

// TestHelp checks that every command's -h prints its help on stdout,
// starting with one line that says what it is, and exits 0.
func TestHelp(t *testing.T) {
	tests := []struct {
		args      []string
		firstLine string // prefix
		contains  string
	}{
		{[]string{"-h"}, "safe: the security officers' tool: ", "Commands:"},
		{[]string{"--help"}, "safe: the security officers' tool: ", "Commands:"},
		{[]string{"help"}, "safe: the security officers' tool: ", "Commands:"},
		{[]string{"genesis", "-h"}, "safe genesis: create the root master key", "-threshold"},
		{[]string{"ceremony", "-h"}, "safe ceremony: open, show or cancel an unseal ceremony", "shares_needed"},
		{[]string{"ceremony", "--help"}, "safe ceremony: open, show or cancel an unseal ceremony", "--json prints one JSON object"},
		{[]string{"ceremony", "help"}, "safe ceremony: open, show or cancel an unseal ceremony", "Verbs:"},
		{[]string{"ceremony", "open", "-h"}, "safe ceremony open: open an unseal ceremony", "-ttl"},
		{[]string{"ceremony", "status", "-h"}, "safe ceremony status: show a distributor's seal state", "-json"},
		{[]string{"ceremony", "cancel", "--help"}, "safe ceremony cancel: cancel an unseal ceremony", "-reason"},
		{[]string{"release", "-h"}, "safe release: release this officer's share", "-manifest"},
		{[]string{"rekey", "-h"}, "safe rekey: re-split the same root key", "-keep-old-shares"},
		{[]string{"seal", "-h"}, "safe seal: seal distributors now", "-fleet"},
		{[]string{"manifest", "install", "-h"}, "safe manifest install: install a rekeyed manifest", "-manifest"},
		{[]string{"retire", "-h"}, "safe retire: destroy this safe's share of an old epoch", "-distributor"},
		{[]string{"drill", "-h"}, "safe drill: prove that the given safes restore the root key", "-safe"},
		{[]string{"list", "-h"}, "safe list: list the shares a safe holds", "-safe"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			var out, errb bytes.Buffer
			code := run(context.Background(), tt.args, &out, &errb)
			first, _, _ := strings.Cut(out.String(), "\n")
			if code != 0 || !strings.HasPrefix(first, tt.firstLine) || !strings.Contains(out.String(), tt.contains) || errb.Len() != 0 {
				t.Errorf("safe %v = %d, stdout %q, stderr %q; want 0, a first line starting %q, containing %q, nothing on stderr",
					tt.args, code, out.String(), errb.String(), tt.firstLine, tt.contains)
			}
		})
	}
	for name, h := range commandHelp {
		if h.summary == "" || h.synopsis == "" || strings.Contains(h.summary, "\n") {
			t.Errorf("commandHelp[%q] = %+v, want a one-line summary and a synopsis", name, h)
		}
	}
}

// TestCeremonyReport checks what the ceremony verbs print, as text and as
// JSON, and the next step they name, for every state a ceremony and a
// distributor can be in.
func TestCeremonyReport(t *testing.T) {
	id := &identity.Flags{TrustDomain: "cairn.local", DevCerts: ".state/up/certs", Name: "officer/global/officer-1"}
	expires := time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)
	opened := expires.Add(-30 * time.Minute)
	cer := func(state distributorv1.CeremonyState, accepted ...uint32) *distributorv1.Ceremony {
		var officers []string
		for _, i := range accepted {
			officers = append(officers, fmt.Sprintf("spiffe://cairn.local/officer/global/officer-%d", i))
		}
		return &distributorv1.Ceremony{Id: "0123456789abcdef0123456789abcdef", Kind: distributorv1.CeremonyKind_CEREMONY_KIND_UNSEAL,
			State: state, GenesisId: "g-1", Threshold: 2, AcceptedIndices: accepted, Officers: officers,
			OpenedAt: timestamppb.New(opened), ExpiresAt: timestamppb.New(expires)}
	}
	const (
		addr    = "127.0.0.1:7101"
		idFlags = " --trust-domain cairn.local --dev-certs .state/up/certs --name officer/global/officer-1"
		release = "safe release --distributor 127.0.0.1:7101 --ceremony 0123456789abcdef0123456789abcdef --safe SAFE_CONFIG --manifest "
		open    = "safe ceremony open --distributor 127.0.0.1:7101" + idFlags
	)
	sealed := &distributorv1.GetStatusResponse{State: distributorv1.SealState_SEAL_STATE_SEALED, GenesisId: "g-1", Kcv: []byte{0xab, 0xcd}}
	unsealed := &distributorv1.GetStatusResponse{State: distributorv1.SealState_SEAL_STATE_UNSEALED, GenesisId: "g-1", Kcv: []byte{0xab, 0xcd}, UnsealedBy: "peer:127.0.0.1:7102"}
	tests := []struct {
		name     string
		c        *distributorv1.Ceremony
		st       *distributorv1.GetStatusResponse
		manifest string
		wantText string
		wantNext next
		needed   uint32
	}{
		{
			name: "just opened", c: cer(distributorv1.CeremonyState_CEREMONY_STATE_OPEN),
			wantText: "ceremony 0123456789abcdef0123456789abcdef (UNSEAL): OPEN, 0 of 2 shares [] from [], expires 2026-03-04T05:06:07Z\n" +
				"next: 2 more shares needed (0 of 2 accepted) before 2026-03-04T05:06:07Z: each officer releases one from their own safe, with their own identity\n" +
				"  " + release + "GENESIS_MANIFEST" + idFlags + "\n",
			wantNext: next{Step: "2 more shares needed (0 of 2 accepted) before 2026-03-04T05:06:07Z: each officer releases one from their own safe, with their own identity",
				Command: release + "GENESIS_MANIFEST" + idFlags},
			needed: 2,
		},
		{
			name: "one released", c: cer(distributorv1.CeremonyState_CEREMONY_STATE_OPEN, 1), manifest: "/srv/genesis.json",
			wantNext: next{Step: "1 more share needed (1 of 2 accepted) before 2026-03-04T05:06:07Z: each officer releases one from their own safe, with their own identity",
				Command: release + "/srv/genesis.json" + idFlags},
			needed: 1,
		},
		{
			name: "sealed, status of the open ceremony", c: cer(distributorv1.CeremonyState_CEREMONY_STATE_OPEN, 2), st: sealed,
			wantText: "distributor 127.0.0.1:7101: SEALED, genesis g-1, KCV abcd, unsealed by \"\"\n" +
				"ceremony 0123456789abcdef0123456789abcdef (UNSEAL): OPEN, 1 of 2 shares [2] from [spiffe://cairn.local/officer/global/officer-2], expires 2026-03-04T05:06:07Z\n" +
				"next: 1 more share needed (1 of 2 accepted) before 2026-03-04T05:06:07Z: each officer releases one from their own safe, with their own identity\n" +
				"  " + release + "GENESIS_MANIFEST" + idFlags + "\n",
			wantNext: next{Step: "1 more share needed (1 of 2 accepted) before 2026-03-04T05:06:07Z: each officer releases one from their own safe, with their own identity",
				Command: release + "GENESIS_MANIFEST" + idFlags},
			needed: 1,
		},
		{
			name: "succeeded", c: cer(distributorv1.CeremonyState_CEREMONY_STATE_SUCCEEDED, 1, 2),
			wantNext: next{Step: "nothing to do: the ceremony unsealed the distributor; its peers unseal from it"},
		},
		{
			name: "expired", c: cer(distributorv1.CeremonyState_CEREMONY_STATE_EXPIRED, 1),
			wantNext: next{Step: "the ceremony ended expired without unsealing the distributor: open a new one", Command: open},
		},
		{
			name: "sealed without a ceremony", st: sealed,
			wantText: "distributor 127.0.0.1:7101: SEALED, genesis g-1, KCV abcd, unsealed by \"\"\n" +
				"next: the distributor is sealed and has no ceremony: open one, then K officers release their shares\n  " + open + "\n",
			wantNext: next{Step: "the distributor is sealed and has no ceremony: open one, then K officers release their shares", Command: open},
		},
		{
			name: "unsealed, the ceremony that unsealed it shown", c: cer(distributorv1.CeremonyState_CEREMONY_STATE_SUCCEEDED, 1, 2), st: unsealed,
			wantNext: next{Step: "nothing to do: the distributor is unsealed (peer:127.0.0.1:7102)"},
		},
		{
			name: "sealed, the last ceremony cancelled", c: cer(distributorv1.CeremonyState_CEREMONY_STATE_CANCELLED), st: sealed,
			wantNext: next{Step: "the ceremony ended cancelled without unsealing the distributor: open a new one", Command: open},
		},
		{
			name: "unsealed", st: unsealed,
			wantText: "distributor 127.0.0.1:7101: UNSEALED, genesis g-1, KCV abcd, unsealed by \"peer:127.0.0.1:7102\"\n" +
				"next: nothing to do: the distributor is unsealed (peer:127.0.0.1:7102)\n",
			wantNext: next{Step: "nothing to do: the distributor is unsealed (peer:127.0.0.1:7102)"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := ceremonyReport{Distributor: addr, Ceremony: ceremonyOf(tt.c), Next: nextStep(addr, tt.c, tt.st, id, tt.manifest)}
			if tt.st != nil {
				r.SealState = strings.TrimPrefix(tt.st.GetState().String(), "SEAL_STATE_")
				r.GenesisID, r.KCV, r.UnsealedBy = tt.st.GetGenesisId(), "abcd", tt.st.GetUnsealedBy()
			}
			if diff := cmp.Diff(tt.wantNext, r.Next); diff != "" {
				t.Errorf("nextStep(%s) mismatch (-want +got):\n%s", tt.name, diff)
			}
			var text bytes.Buffer
			if err := r.write(&text, false); err != nil {
				t.Fatal(err)
			}
			if tt.wantText != "" && text.String() != tt.wantText {
				t.Errorf("text of %s = %q, want %q", tt.name, text.String(), tt.wantText)
			}
			var js bytes.Buffer
			if err := r.write(&js, true); err != nil {
				t.Fatal(err)
			}
			// The documented field names, read back generically.
			var got map[string]any
			if err := json.Unmarshal(js.Bytes(), &got); err != nil {
				t.Fatalf("JSON of %s = %s: %v", tt.name, js.String(), err)
			}
			nx, _ := got["next"].(map[string]any)
			if got["distributor"] != addr || nx["step"] != tt.wantNext.Step || (tt.wantNext.Command != "" && nx["command"] != tt.wantNext.Command) {
				t.Errorf("JSON of %s = %s, want distributor %s and next %+v", tt.name, js.String(), addr, tt.wantNext)
			}
			c, _ := got["ceremony"].(map[string]any)
			switch {
			case tt.c == nil && got["ceremony"] != nil:
				t.Errorf("JSON of %s: ceremony = %v, want null", tt.name, got["ceremony"])
			case tt.c != nil && (c["id"] != tt.c.GetId() || c["state"] != strings.TrimPrefix(tt.c.GetState().String(), "CEREMONY_STATE_") ||
				c["threshold"] != float64(2) || c["shares_needed"] != float64(tt.needed) || c["expires_at"] != "2026-03-04T05:06:07Z" ||
				len(c["accepted_shares"].([]any)) != len(tt.c.GetAcceptedIndices())):
				t.Errorf("JSON of %s: ceremony = %v, want id, state, threshold 2, shares_needed %d, expires_at, accepted_shares", tt.name, c, tt.needed)
			}
			if tt.st != nil && (got["seal_state"] != r.SealState || got["kcv"] != "abcd" || got["genesis_id"] != "g-1") {
				t.Errorf("JSON of %s = %s, want seal_state %s, kcv abcd, genesis_id g-1", tt.name, js.String(), r.SealState)
			}
		})
	}
}

func TestCommandLine(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"safe", "release", "--name", "officer/global/officer-1"}, "safe release --name officer/global/officer-1"},
		{[]string{"bin/safe", "--dev-certs", "/home/me/my certs"}, "bin/safe --dev-certs '/home/me/my certs'"},
		{[]string{"x", "it's"}, `x 'it'\''s'`},
	} {
		if got := commandLine(tt.args); got != tt.want {
			t.Errorf("commandLine(%q) = %q, want %q", tt.args, got, tt.want)
		}
	}
}

// TestDrillSkipsUnopenedSafe: `safe drill` with a safe whose config does not
// open (here: its passphrase file is gone) still passes on the others when
// they reach the threshold, and names the skipped safe; with too few left
// it fails naming it, and no share or passphrase is in what it prints.
func TestDrillSkipsUnopenedSafe(t *testing.T) {
	dir := t.TempDir()
	configs := fileSafeConfigs(t, dir, 3)
	manifest := filepath.Join(dir, "manifest.json")
	var out, errOut bytes.Buffer
	args := []string{"genesis", "--threshold", "2", "--manifest", manifest}
	for _, c := range configs {
		args = append(args, "--safe", c)
	}
	if code := run(context.Background(), args, &out, &errOut); code != 0 {
		t.Fatalf("safe genesis = %d: %s%s", code, out.String(), errOut.String())
	}
	if err := os.Remove(filepath.Join(dir, "safe-3.passphrase")); err != nil {
		t.Fatal(err)
	}

	drill := func(safes ...string) (int, string) {
		var out, errOut bytes.Buffer
		args := []string{"drill", "--manifest", manifest}
		for _, s := range safes {
			args = append(args, "--safe", s)
		}
		code := run(context.Background(), args, &out, &errOut)
		return code, out.String() + errOut.String()
	}
	code, got := drill(configs...)
	if code != 0 || !strings.Contains(got, "drill passed") || !strings.Contains(got, "skipped, fix before a real ceremony: safe: "+configs[2]) {
		t.Errorf("safe drill with safe-3 unopenable = %d:\n%s\nwant it to pass and name %s as skipped", code, got, configs[2])
	}
	code, got = drill(configs[0], configs[2])
	if code == 0 || !strings.Contains(got, "1 of 2 safe(s) opened, the threshold is 2") || !strings.Contains(got, configs[2]) {
		t.Errorf("safe drill with 1 of 2 safes openable = %d:\n%s\nwant a failure naming the threshold and %s", code, got, configs[2])
	}
	if strings.Contains(got, "drill passphrase") {
		t.Errorf("safe drill printed a passphrase:\n%s", got)
	}
}

// fileSafeConfigs writes the configs of n file safes safe-1..safe-n, in dir
// (the safes themselves are made when first opened), and returns their paths.
func fileSafeConfigs(t *testing.T, dir string, n int) []string {
	t.Helper()
	var configs []string
	for i := 1; i <= n; i++ {
		label := fmt.Sprintf("safe-%d", i)
		pass := filepath.Join(dir, label+".passphrase")
		if err := os.WriteFile(pass, []byte("drill passphrase of "+label+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, err := json.Marshal(map[string]any{"kind": safe.KindInsecureFile, "label": label, "dir": filepath.Join(dir, label),
			"passphrase_file": pass, "kdf_memory_kib": 8192, "attempt_dir": filepath.Join(dir, "attempts")})
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, label+".json")
		if err := os.WriteFile(path, cfg, 0o600); err != nil {
			t.Fatal(err)
		}
		configs = append(configs, path)
	}
	return configs
}

// TestGenesisRefusesBadOfficers: `safe genesis --officers` with officers a
// distributor could never match (the relative form the allowlists use, one
// named twice, or of another trust domain than --trust-domain) exits 1
// naming the entry, before any safe is opened: no manifest, no share.
func TestGenesisRefusesBadOfficers(t *testing.T) {
	full := func(td string, i int) string { return fmt.Sprintf("spiffe://%s/officer/global/officer-%d", td, i) }
	tests := []struct {
		name  string
		flags []string
		want  string
	}{
		{"relative", []string{"--officers", "officer/global/officer-1,officer/global/officer-2"},
			`safe genesis: --officers: officer "officer/global/officer-1" of share 1 is not a full SPIFFE ID`},
		{"named twice", []string{"--officers", full("cairn.local", 1) + "," + full("cairn.local", 1)},
			"safe genesis: --officers: officer " + full("cairn.local", 1) + " is named for shares 1 and 2"},
		{"another trust domain", []string{"--trust-domain", "cairn.local", "--officers", full("cairn.local", 1) + "," + full("other.local", 2)},
			"safe genesis: --officers: officer " + full("other.local", 2) + " of share 2 is of trust domain other.local"},
		{"not of --trust-domain", []string{"--trust-domain", "cairn.local", "--officers", full("other.local", 1) + "," + full("other.local", 2)},
			"safe genesis: --officers: officer " + full("other.local", 1) + " of share 1 is not of --trust-domain cairn.local"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			configs := fileSafeConfigs(t, dir, 2)
			manifest := filepath.Join(dir, "manifest.json")
			args := append([]string{"genesis", "--threshold", "2", "--manifest", manifest, "--safe", configs[0], "--safe", configs[1]}, tt.flags...)
			var out, errOut bytes.Buffer
			if code := run(context.Background(), args, &out, &errOut); code != 1 || !strings.Contains(errOut.String(), tt.want) {
				t.Errorf("safe %v = %d, %q; want 1 containing %q", args, code, out.String()+errOut.String(), tt.want)
			}
			for _, p := range []string{manifest, filepath.Join(dir, "safe-1"), filepath.Join(dir, "safe-2")} {
				if _, err := os.Stat(p); !os.IsNotExist(err) {
					t.Errorf("a refused genesis made %s (%v)", p, err)
				}
			}
		})
	}
}
