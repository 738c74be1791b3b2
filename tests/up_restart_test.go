package tests

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cairnkms/cairn/cmd/cairn/chain"
	"github.com/cairnkms/cairn/tests/framework"
)

// TestUpOperatorTools runs the real launcher with SoftHSM2 safes (`cairn up
// --safes softhsm --no-demo`) and works the chain as an operator does, by
// hand, with the real binaries: the safes open from their configs alone
// (SOFTHSM2_CONF points elsewhere); `safe ceremony status --json` and
// `cairn kms status --json` say what runs and what to do next; `cairn up
// restart` restarts a KMS server, a root KMS voter and a distributor of the
// running chain, each ready again under a new PID recorded in chain.json,
// and brings back a KMS server that was killed, as kms status's next
// command says; an unknown component, and any component once the chain is
// stopped, are refused.
func TestUpOperatorTools(t *testing.T) {
	// No SOFTHSM2_CONF anywhere: the launcher sets it for its own safe
	// commands, an officer's safe configs carry it.
	t.Setenv("SOFTHSM2_CONF", "")
	os.Unsetenv("SOFTHSM2_CONF")
	regions := chain.DefaultRegions
	base := framework.FreeBasePort(t, regions)
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	logs := filepath.Join(dir, "logs")
	l := framework.StartLauncher(t, bin, "cairn-up-softhsm", logs, state, "--base-port", strconv.Itoa(base), "--safes", "softhsm", "--no-demo")
	t.Logf("chain ready (first run, SoftHSM2 safes) in %s", l.WaitReady().Round(100*time.Millisecond))
	info := l.Info()
	if info.Safes != chain.SafesSoftHSM || info.Control == "" {
		t.Fatalf("chain.json: safes %q, control %q; want softhsm and a control socket", info.Safes, info.Control)
	}

	t.Run("softhsm safes by hand", func(t *testing.T) {
		elsewhere := "SOFTHSM2_CONF=" + filepath.Join(dir, "no-such-softhsm2.conf") // an officer's shell
		safe1, safe2 := filepath.Join(state, "safes", "safe-1.json"), filepath.Join(state, "safes", "safe-2.json")
		list := framework.Run(t, "safe-list-by-hand", logs, bin.Safe, []string{"list", "--safe", safe1}, elsewhere)
		if list.ExitCode != 0 || !strings.Contains(list.Stdout, "safe safe-1 (pkcs11): 1 share(s)") {
			t.Errorf("safe list on a make-up SoftHSM2 safe, by hand: %s\nwant exit 0 and its one share", list)
		}
		drill := framework.Run(t, "safe-drill-by-hand", logs, bin.Safe, []string{"drill", "--manifest", info.Manifest, "--safe", safe1, "--safe", safe2}, elsewhere)
		if drill.ExitCode != 0 || !strings.Contains(drill.Stdout, "drill passed") {
			t.Errorf("safe drill with two make-up SoftHSM2 safes, by hand: %s\nwant exit 0, drill passed", drill)
		}
	})

	officer := []string{"--trust-domain", info.TrustDomain, "--dev-certs", info.CertsDir, "--name", "officer/global/officer-1"}
	d1 := framework.Component(t, info, "distributor-1")
	t.Run("safe ceremony status", func(t *testing.T) {
		r := framework.Run(t, "safe-ceremony-status-json", logs, bin.Safe, append([]string{"ceremony", "status", "--distributor", d1.Address, "--json"}, officer...))
		var got struct {
			Distributor string          `json:"distributor"`
			SealState   string          `json:"seal_state"`
			UnsealedBy  string          `json:"unsealed_by"`
			Ceremony    json.RawMessage `json:"ceremony"`
			Next        struct {
				Step    string `json:"step"`
				Command string `json:"command"`
			} `json:"next"`
		}
		if err := json.Unmarshal([]byte(r.Stdout), &got); r.ExitCode != 0 || err != nil {
			t.Fatalf("safe ceremony status --json: %v\n%s", err, r)
		}
		// The ceremony it still shows is the genesis's, which unsealed it.
		if got.Distributor != d1.Address || got.SealState != "UNSEALED" || !strings.Contains(string(got.Ceremony), `"kind": "PROVISION"`) ||
			!strings.HasPrefix(got.Next.Step, "nothing to do: the distributor is unsealed (genesis:") || got.Next.Command != "" {
			t.Errorf("safe ceremony status --json = %+v (ceremony %s), want %s UNSEALED by genesis, nothing to do", got, got.Ceremony, d1.Address)
		}
		text := framework.Run(t, "safe-ceremony-status", logs, bin.Safe, append([]string{"ceremony", "status", "--distributor", d1.Address}, officer...))
		if text.ExitCode != 0 || !strings.Contains(text.Stdout, "distributor "+d1.Address+": UNSEALED") || !strings.Contains(text.Stdout, "\nnext: nothing to do: the distributor is unsealed") {
			t.Errorf("safe ceremony status = %s\nwant UNSEALED and a next line", text)
		}
	})

	restart := func(name string, wantReady string) chain.Component {
		t.Helper()
		old := framework.Component(t, info, name)
		start := time.Now()
		r := framework.Run(t, "cairn-up-restart-"+strings.ReplaceAll(name, "/", "-"), logs, bin.Cairn, []string{"up", "restart", "--state-dir", state, name})
		took := time.Since(start)
		info = l.Info() // the cleanup then waits for the new PIDs too
		c := framework.Component(t, info, name)
		t.Logf("cairn up restart %s: %s (pid %d -> %d)", name, took.Round(time.Millisecond), old.PID, c.PID)
		for _, want := range []string{fmt.Sprintf("(pid %d)", old.PID), fmt.Sprintf("started %s (pid %d)", name, c.PID),
			name + " ready: " + wantReady, "restarted " + name} {
			if r.ExitCode != 0 || !strings.Contains(r.Stdout, want) {
				t.Errorf("cairn up restart %s = %s\nwant exit 0 and %q", name, r, want)
			}
		}
		if c.PID == old.PID {
			t.Errorf("chain.json: %s still pid %d after its restart", name, c.PID)
		}
		framework.RequireComponentsGone(t, []chain.Component{old}, framework.ComponentsGoneTimeout)
		framework.RequireComponentsRunning(t, info.Components)
		l.WaitOutput("the launcher reporting the restart of "+name, func(stdout, _ string) bool {
			return strings.Contains(stdout, "cairn up: restarted "+name)
		})
		return c
	}
	restart("us-east/kms-1", "SERVING serial 1, 2 keysets")
	restart("rootkms-2", "serving in a cluster of 3 voters")
	restart("distributor-1", "unsealed by peer:")
	if strings.Contains(l.Stderr(), "exited unexpectedly") {
		t.Errorf("the launcher reported a death for a restart:\n%s", l.Stderr())
	}
	kmsStatus := func(name string) (framework.Result, statusJSON) {
		t.Helper()
		r := framework.Run(t, name, logs, bin.Cairn, []string{"kms", "status", "--chain", state, "--json"})
		var st statusJSON
		if err := json.Unmarshal([]byte(r.Stdout), &st); err != nil {
			t.Fatalf("cairn kms status --json: %v\n%s", err, r)
		}
		return r, st
	}
	r, st := kmsStatus("kms-status-json")
	if r.ExitCode != 0 || len(st.Servers) != 4 || st.Unreachable != 0 || len(st.Next) != 0 {
		t.Errorf("cairn kms status --json after the restarts = %+v\n%s\nwant 4 servers, none unreachable, nothing next", st, r)
	}
	for _, s := range st.Servers {
		if s.State != "SERVING" || s.BundleSerial != 1 || s.PID != framework.Component(t, info, s.Name).PID {
			t.Errorf("cairn kms status --json: %+v, want SERVING serial 1 with chain.json's pid", s)
		}
	}

	// A KMS server that was killed: kms status says what to run, and it
	// brings the server back.
	dead := l.KillComponent(info, "us-east/kms-2")
	l.WaitOutput("the launcher reporting us-east/kms-2's exit", func(_, stderr string) bool {
		return strings.Contains(stderr, fmt.Sprintf("us-east/kms-2: exited unexpectedly (pid %d", dead.PID))
	})
	r, st = kmsStatus("kms-status-json-one-down")
	wantNext := "cairn up restart --state-dir " + state + " us-east/kms-2"
	if r.ExitCode != 1 || st.Unreachable != 1 || len(st.Next) != 1 || st.Next[0].Command != wantNext {
		t.Fatalf("cairn kms status --json with us-east/kms-2 killed = %+v\n%s\nwant exit 1, 1 unreachable, next %q", st, r, wantNext)
	}
	text := framework.Run(t, "kms-status-one-down", logs, bin.Cairn, []string{"kms", "status", "--chain", state})
	if !strings.Contains(text.Stdout, "next: us-east/kms-2 is unreachable: restart it in the running chain\n  "+wantNext) {
		t.Errorf("cairn kms status with us-east/kms-2 killed = %s\nwant the next command %q", text, wantNext)
	}
	args := strings.Fields(wantNext)[1:]
	back := framework.Run(t, "cairn-up-restart-dead", logs, bin.Cairn, args)
	if want := fmt.Sprintf("us-east/kms-2 (pid %d) had already exited: killed by SIGKILL", dead.PID); back.ExitCode != 0 || !strings.Contains(back.Stdout, want) {
		t.Errorf("%s = %s\nwant exit 0 and %q", wantNext, back, want)
	}
	info = l.Info()
	if r, st = kmsStatus("kms-status-json-back"); r.ExitCode != 0 || st.Unreachable != 0 {
		t.Errorf("cairn kms status --json after restarting us-east/kms-2 = %+v\n%s\nwant every server reachable", st, r)
	}

	unknown := framework.Run(t, "cairn-up-restart-unknown", logs, bin.Cairn, []string{"up", "restart", "--state-dir", state, "us-east/kms-3"})
	if unknown.ExitCode != 1 || !strings.Contains(unknown.Stderr, `no component "us-east/kms-3"`) {
		t.Errorf("cairn up restart us-east/kms-3 = %s\nwant exit 1 naming the components", unknown)
	}

	// Stopped (exit 1: a component died meanwhile), the chain restarts
	// nothing.
	l.Send(syscall.SIGTERM)
	if code := l.ExitCode(); code != 1 {
		t.Errorf("cairn up: exit %d after SIGTERM with a component killed meanwhile, want 1\n%s", code, l.Stdout())
	}
	framework.RequireComponentsGone(t, info.Components, 0)
	after := framework.Run(t, "cairn-up-restart-stopped", logs, bin.Cairn, []string{"up", "restart", "--state-dir", state, "rootkms-1"})
	if after.ExitCode != 1 || !strings.Contains(after.Stderr, "the chain is not running: the chain in "+state+" was stopped at") {
		t.Errorf("cairn up restart after the stop = %s\nwant exit 1, not running", after)
	}
	if _, err := os.Stat(info.Control); !os.IsNotExist(err) {
		t.Errorf("control socket %s after the stop: %v, want it removed", info.Control, err)
	}
	// No root key, share or user PIN in any file (the tokens' own storage
	// holds the shares sealed).
	requireNoUpSecrets(t, state, nil, logs)
}

// statusJSON is `cairn kms status --json` as the test reads it.
type statusJSON struct {
	Chain   string `json:"chain"`
	Servers []struct {
		Name         string `json:"name"`
		PID          int    `json:"pid"`
		State        string `json:"state"`
		BundleSerial uint64 `json:"bundle_serial"`
	} `json:"servers"`
	Unreachable int `json:"unreachable"`
	Next        []struct {
		Why     string `json:"why"`
		Command string `json:"command"`
	} `json:"next"`
}
