package tests

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/cairnkms/cairn/internal/audit"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/tests/framework"
)

// TestRekeyCeremonyAcrossProcesses: `safe rekey` opens a rekey ceremony on
// a distributor and releases its officer's share; another officer releases
// theirs with `safe release`; the distributor re-splits the key to three
// new safes; the new manifest is installed on (and read back from) every
// distributor before the old share is destroyed; after a full restart the
// new shares, and only they, unseal the fleet. No file holds the RMK, a
// new share or any safe's passphrase.
func TestRekeyCeremonyAcrossProcesses(t *testing.T) {
	w := framework.NewWorld(t, bin)
	all := w.FileSafes(6)
	olds, news := all[:3], all[3:]
	ds := w.Distributors(3, true)
	for _, d := range ds {
		d.Start()
	}
	for _, d := range ds {
		d.WaitState(sealed)
	}
	m := w.Genesis(2, olds, ds...)
	var addrs []string
	for _, d := range ds {
		waitUnsealed(t, d, m)
		addrs = append(addrs, d.Addr)
	}
	rmk := fetchRMK(t, ds[0], m)
	defer clear(rmk)

	out := filepath.Join(w.Dir, "manifest-epoch-1.json")
	args := append([]string{"rekey", "--distributor", strings.Join(addrs, ","), "--threshold", "2", "--manifest", w.ManifestPath(), "--out", out,
		"--old-safe", olds[0].Path, "--wait", "1m", "--officers", strings.Join([]string{framework.SPIFFEID(framework.Officer(1)), framework.SPIFFEID(framework.Officer(2)), framework.SPIFFEID(framework.Officer(3))}, ",")},
		w.IDFlags(framework.Officer(1))...)
	for _, s := range news {
		args = append(args, "--safe", s.Path)
	}
	done := make(chan framework.Result, 1)
	go func() { done <- w.Safe(args...) }()
	// Officer 2 releases into the rekey ceremony once officer 1's share is in.
	st, _ := ds[0].WaitStatus("a rekey ceremony with share 1", func(st *distributorv1.GetStatusResponse) bool {
		c := st.GetCeremony()
		return c.GetKind() == distributorv1.CeremonyKind_CEREMONY_KIND_REKEY && len(c.GetAcceptedIndices()) == 1
	})
	if r := w.Release(ds[0], st.GetCeremony().GetId(), framework.Officer(2), olds[1]); r.ExitCode != 0 {
		t.Fatalf("officer 2 release into the rekey ceremony failed:\n%s", r)
	}
	r := <-done
	if r.ExitCode != 0 {
		t.Fatalf("safe rekey failed:\n%s", r)
	}
	m1, err := safe.ReadManifest(out)
	if err != nil || m1.GetEpoch() != 1 || m1.GetGenesisId() != m.GetGenesisId() {
		t.Fatalf("rekeyed manifest = %v, %v; want epoch 1 of genesis %s", m1, err, m.GetGenesisId())
	}
	for _, d := range ds {
		st, err := d.Status()
		if err != nil || st.GetEpoch() != 1 {
			t.Errorf("GetStatus(%s).Epoch = %d, %v; want 1", d.Name, st.GetEpoch(), err)
		}
		if d == ds[0] && !hasAuditRecord(d.Audit(), d.Name, "distributor/rekey", audit.OutcomeOK) {
			t.Errorf("audit log of %s: no rekey record", d.Name)
		}
		if !hasAuditRecord(d.Audit(), framework.Officer(1), "distributor/install-manifest", audit.OutcomeOK) {
			t.Errorf("audit log of %s: no install-manifest record by officer 1", d.Name)
		}
	}
	// Officer 1's old share is gone; officer 2 retires theirs.
	if l := w.SafeOK("list", "--safe", olds[0].Path); !strings.Contains(l.Stdout, "0 share(s)") {
		t.Errorf("safe list of the old safe 1 after the rekey = %q, want no share", l.Stdout)
	}
	w.SafeOK(append([]string{"retire", "--safe", olds[1].Path, "--manifest", w.ManifestPath(), "--distributor", strings.Join(addrs, ",")}, w.IDFlags(framework.Officer(2))...)...)

	// Full restart: the new shares unseal the fleet; an old one is refused.
	for _, d := range ds {
		d.Kill()
	}
	for _, d := range ds {
		d.Restart()
	}
	ds[0].WaitState(sealed)
	id := w.OpenCeremony(ds[0], 1)
	if r := w.Release(ds[0], id, framework.Officer(3), olds[2]); r.ExitCode == 0 {
		t.Errorf("an old-epoch share was accepted after the rekey:\n%s", r)
	}
	for _, i := range []int{1, 3} {
		a := append([]string{"release", "--distributor", ds[0].Addr, "--ceremony", id, "--safe", news[i-1].Path, "--manifest", out}, w.IDFlags(framework.Officer(i))...)
		w.SafeOK(a...)
	}
	for _, d := range ds {
		waitUnsealed(t, d, m1)
	}
	requireSameRMK(t, m, rmk, ds...)

	// No secret in any file: the RMK (recovered from the new safes), the
	// new shares and passphrases, and the old safes' passphrases too.
	for _, d := range ds {
		d.Stop()
	}
	requireNoSecrets(t, w, m1, news, rmk, unlockSecrets(olds))
}
