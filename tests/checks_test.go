package tests

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cairnkms/cairn/internal/audit"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/tests/framework"
)

const (
	sealed   = distributorv1.SealState_SEAL_STATE_SEALED
	unsealed = distributorv1.SealState_SEAL_STATE_UNSEALED
)

// fetchRMK fetches the root key from d as the root KMS, checks it against
// the manifest (the reply's KCV and the key's own), and returns a copy.
func fetchRMK(t *testing.T, d *framework.Distributor, m *safev1.GenesisManifest) []byte {
	t.Helper()
	rmk, resp, err := d.FetchRootKey(framework.RootKMS, m.GetGenesisId())
	if err != nil {
		t.Fatalf("FetchRootKey(%s as %s) = %v, want the root key", d.Name, framework.RootKMS, err)
	}
	defer rmk.Wipe()
	if !bytes.Equal(resp.GetKcv(), m.GetKcv()) || resp.GetGenesisId() != m.GetGenesisId() {
		t.Fatalf("FetchRootKey(%s) names genesis %s KCV %x, want %s KCV %x", d.Name, resp.GetGenesisId(), resp.GetKcv(), m.GetGenesisId(), m.GetKcv())
	}
	if !safe.CheckKCV(rmk, m) {
		t.Fatalf("FetchRootKey(%s): the key does not have the manifest's KCV %x", d.Name, m.GetKcv())
	}
	return rmk.Data()
}

// requireSameRMK fetches the key from every distributor and checks it is
// want.
func requireSameRMK(t *testing.T, m *safev1.GenesisManifest, want []byte, ds ...*framework.Distributor) {
	t.Helper()
	for _, d := range ds {
		got := fetchRMK(t, d, m)
		if !bytes.Equal(got, want) {
			t.Errorf("FetchRootKey(%s) returned another key than the fleet's", d.Name)
		}
		clear(got)
	}
}

// waitUnsealed waits until d is unsealed with the manifest's genesis and
// KCV, and returns its status.
func waitUnsealed(t *testing.T, d *framework.Distributor, m *safev1.GenesisManifest) *distributorv1.GetStatusResponse {
	t.Helper()
	st, _ := d.WaitState(unsealed)
	if st.GetGenesisId() != m.GetGenesisId() || !bytes.Equal(st.GetKcv(), m.GetKcv()) {
		t.Fatalf("GetStatus(%s) = genesis %s KCV %x, want %s KCV %x", d.Name, st.GetGenesisId(), st.GetKcv(), m.GetGenesisId(), m.GetKcv())
	}
	return st
}

// requireUnsealedBy checks how d was unsealed ("peer:", "ceremony:<id>",
// "genesis:" ...).
func requireUnsealedBy(t *testing.T, d *framework.Distributor, st *distributorv1.GetStatusResponse, prefix string) {
	t.Helper()
	if !strings.HasPrefix(st.GetUnsealedBy(), prefix) {
		t.Errorf("GetStatus(%s).UnsealedBy = %q, want prefix %q", d.Name, st.GetUnsealedBy(), prefix)
	}
}

// release runs `safe release` as officer i with safe i and fails unless it
// exits 0.
func release(t *testing.T, w *framework.World, d *framework.Distributor, id string, safes []framework.SafeConfig, i int) framework.Result {
	t.Helper()
	r := w.Release(d, id, framework.Officer(i), safes[i-1])
	if r.ExitCode != 0 {
		t.Fatalf("officer %d release into %s failed:\n%s", i, id, r)
	}
	return r
}

// acceptedIndices returns the ceremony's accepted share indices.
func acceptedIndices(t *testing.T, d *framework.Distributor, id string) []uint32 {
	t.Helper()
	c, err := d.Ceremony(id)
	if err != nil {
		t.Fatalf("GetCeremony(%s, %s) = %v", d.Name, id, err)
	}
	return c.GetAcceptedIndices()
}

// hasAuditRecord reports whether recs hold a record of identity name calling
// op with the given outcome.
func hasAuditRecord(recs []audit.Record, name, op string, outcome audit.Outcome) bool {
	return slices.ContainsFunc(recs, func(r audit.Record) bool {
		return r.Identity == framework.SPIFFEID(name) && r.Operation == op && r.Outcome == outcome
	})
}

// requireOnlyPublicState checks that a distributor's state directory holds
// the pinned manifest and the audit log and nothing else: no share, no
// ceremony progress, no key.
func requireOnlyPublicState(t *testing.T, d *framework.Distributor) {
	t.Helper()
	entries, err := os.ReadDir(d.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if want := []string{"audit.log", "genesis.json"}; !slices.Equal(names, want) {
		t.Errorf("state dir of %s = %v, want %v", d.Name, names, want)
	}
	// The audit log and the directory are private; the manifest is public.
	for _, f := range []struct {
		path string
		want os.FileMode
	}{
		{d.StateDir, 0o700},
		{filepath.Join(d.StateDir, "audit.log"), 0o600},
		{filepath.Join(d.StateDir, "genesis.json"), 0o644},
	} {
		fi, err := os.Stat(f.path)
		if err != nil {
			t.Errorf("Stat(%s) = %v", f.path, err)
			continue
		}
		if got := fi.Mode().Perm(); got != f.want {
			t.Errorf("mode of %s = %#o, want %#o", f.path, got, f.want)
		}
	}
}

// requireNoKeyMaterial recovers the RMK in this process from three of the
// safes, unseals every share, and scans every file under the world's
// directory and the extra roots (state dirs, audit logs, every process's
// stdout and stderr, manifests, configs, and the safes' own storage and
// token files) for any of them, raw or encoded. If wantRMK is not nil the
// recovered key must equal it.
func requireNoKeyMaterial(t *testing.T, w *framework.World, m *safev1.GenesisManifest, safes []framework.SafeConfig, wantRMK []byte, extraRoots ...string) {
	t.Helper()
	requireNoSecrets(t, w, m, safes, wantRMK, nil, extraRoots...)
}

// requireNoSecrets is requireNoKeyMaterial that also looks for the extra
// secrets (region keys, for instance). It clears their values when done.
func requireNoSecrets(t *testing.T, w *framework.World, m *safev1.GenesisManifest, safes []framework.SafeConfig, wantRMK []byte, extra []framework.Secret, extraRoots ...string) {
	t.Helper()
	w.RequireNoSecrets(m, safes, wantRMK, extra, extraRoots...)
}
