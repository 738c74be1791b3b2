package tests

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/cairnkms/cairn/tests/framework"
)

// ceremonyJSON is `safe ceremony ... --json` (and `safe release --json`) as
// the test reads it.
type ceremonyJSON struct {
	Distributor string `json:"distributor"`
	SealState   string `json:"seal_state"`
	UnsealedBy  string `json:"unsealed_by"`
	Ceremony    *struct {
		ID             string   `json:"id"`
		Kind           string   `json:"kind"`
		State          string   `json:"state"`
		Threshold      int      `json:"threshold"`
		AcceptedShares []int    `json:"accepted_shares"`
		Officers       []string `json:"officers"`
		SharesNeeded   int      `json:"shares_needed"`
	} `json:"ceremony"`
	Next struct {
		Step    string `json:"step"`
		Command string `json:"command"`
	} `json:"next"`
}

// TestCeremonyNextCommands unseals a restarted distributor by running only
// the next commands `safe` prints (--json), with the officer's safe,
// manifest and name filled in: status names `safe ceremony open`, open and
// each release name `safe release` and how many shares are still needed,
// and once unsealed there is nothing to do. No file holds the RMK, a share
// or a passphrase.
func TestCeremonyNextCommands(t *testing.T) {
	w := framework.NewWorld(t, bin)
	safes := w.FileSafes(3)
	d := w.Distributors(1, false)[0]
	d.Start()
	d.WaitState(sealed)
	m := w.Genesis(2, safes, d)
	waitUnsealed(t, d, m)
	d.Kill()
	d.Restart()
	d.WaitState(sealed)

	// run runs a printed command (the binary's path first: the paths here
	// hold no spaces) with --json, and decodes its answer.
	run := func(name, command string, replace ...string) ceremonyJSON {
		t.Helper()
		f := strings.Fields(strings.NewReplacer(replace...).Replace(command))
		if len(f) == 0 || f[0] != w.Bin.Safe {
			t.Fatalf("next command %q does not start with the safe binary %s", command, w.Bin.Safe)
		}
		r := w.Run(name, f[0], append(f[1:], "--json")...)
		t.Logf("%s: %s", name, strings.Join(f[1:], " "))
		var got ceremonyJSON
		if err := json.Unmarshal([]byte(r.Stdout), &got); r.ExitCode != 0 || err != nil {
			t.Fatalf("%s: %v\n%s", name, err, r)
		}
		return got
	}
	officer1 := strings.Join(w.IDFlags(framework.Officer(1)), " ")
	st := run("status-sealed", w.Bin.Safe+" ceremony status --distributor "+d.Addr+" "+officer1)
	wantOpen := w.Bin.Safe + " ceremony open --distributor " + d.Addr + " " + officer1
	if st.SealState != "SEALED" || st.Ceremony != nil || st.Next.Command != wantOpen {
		t.Fatalf("status of the sealed distributor = %+v, want SEALED, no ceremony, next %q", st, wantOpen)
	}

	c := run("open", st.Next.Command)
	if c.Ceremony == nil || c.Ceremony.State != "OPEN" || c.Ceremony.Kind != "UNSEAL" || c.Ceremony.Threshold != 2 || c.Ceremony.SharesNeeded != 2 ||
		!strings.HasPrefix(c.Next.Step, "2 more shares needed (0 of 2 accepted)") || !strings.Contains(c.Next.Command, " release --distributor "+d.Addr+" --ceremony "+c.Ceremony.ID) {
		t.Fatalf("safe ceremony open --json = %+v, want an open unseal ceremony needing 2 shares and the release command", c)
	}
	next := c.Next.Command
	for i, wantNeeded := range []int{1, 0} {
		officer := framework.Officer(i + 1)
		got := run("release-officer-"+officer[len(officer)-1:], next,
			"SAFE_CONFIG", safes[i].Path, "GENESIS_MANIFEST", w.ManifestPath(), framework.Officer(1), officer)
		if got.Ceremony == nil || got.Ceremony.SharesNeeded != wantNeeded || len(got.Ceremony.AcceptedShares) != i+1 {
			t.Fatalf("release by %s = %+v, want %d shares accepted, %d needed", officer, got, i+1, wantNeeded)
		}
		if wantNeeded > 0 && (!strings.Contains(got.Next.Command, "--manifest "+w.ManifestPath()) || !strings.HasPrefix(got.Next.Step, "1 more share needed (1 of 2 accepted)")) {
			t.Errorf("release by %s: next = %+v, want 1 more share and the release command with the manifest", officer, got.Next)
		}
		if wantNeeded == 0 && (got.Ceremony.State != "SUCCEEDED" || got.Next.Command != "") {
			t.Errorf("last release: %+v, want SUCCEEDED and nothing to run", got)
		}
		next = got.Next.Command
	}
	waitUnsealed(t, d, m)
	done := run("status-unsealed", wantOpen, " open ", " status ")
	if done.SealState != "UNSEALED" || !strings.HasPrefix(done.Next.Step, "nothing to do: the distributor is unsealed (ceremony:"+c.Ceremony.ID) || done.Next.Command != "" {
		t.Errorf("status once unsealed = %+v, want UNSEALED by the ceremony and nothing to do", done)
	}

	// The text form prints the same next step.
	text := w.Safe("ceremony", "status", "--distributor", d.Addr, "--trust-domain", framework.TrustDomain, "--dev-certs", w.Certs, "--name", framework.Officer(2))
	if text.ExitCode != 0 || !strings.Contains(text.Stdout, "\nnext: nothing to do: the distributor is unsealed (ceremony:"+c.Ceremony.ID+")\n") {
		t.Errorf("safe ceremony status = %s\nwant the next step", text)
	}
	d.Stop()
	requireNoKeyMaterial(t, w, m, safes, nil)
}
