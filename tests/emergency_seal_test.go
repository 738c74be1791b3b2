package tests

import (
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/audit"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/tests/framework"
)

// holdSealed is how long the sealed fleet is watched: many times the
// distributors' peer fetch period (200ms after a successful fetch) and the
// root KMS's root key retry.
const holdSealed = 3 * time.Second

// TestFleetEmergencySeal: `safe seal --fleet` as an officer seals three
// peered distributors and makes a root KMS replica drop its root key. The
// fleet stays sealed (no distributor fetches from a peer, none hands the key
// out), the replica refuses UnwrapRegionKey, every step is audited, and a
// quorum unseal ceremony brings the chain back. No file holds the RMK, a
// share, a passphrase or the region key.
func TestFleetEmergencySeal(t *testing.T) {
	w := framework.NewWorld(t, bin)
	safes := w.FileSafes(3)
	ds := w.Distributors(3, true)
	for _, d := range ds {
		d.Start()
	}
	for _, d := range ds {
		d.WaitState(sealed)
	}
	m := w.Genesis(2, safes, ds...)
	var addrs []string
	for _, d := range ds {
		waitUnsealed(t, d, m)
		addrs = append(addrs, d.Addr)
	}
	root := w.RootKMSCluster(framework.FastRaft(w.ManifestPath(), addrs...), framework.Voter(1))[0]
	root.Start()
	framework.WaitLeader(root)
	root.WaitServing()
	c := w.RootKMSClient(framework.Regionctl, root)
	writeOK(t, c, nil, 0, framework.OpCreate, "us-east")
	const kms = "kms/us-east/kms-1"
	if _, _, err := root.UnwrapRegionKey(kms, "us-east"); err != nil {
		t.Fatalf("UnwrapRegionKey before the seal = %v", err)
	}

	// A replica is no officer: it may not drop the key.
	if _, err := root.Client(framework.RootKMS).DropRootKey(t.Context(), &rootkmsv1.DropRootKeyRequest{Reason: "x"}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("DropRootKey as a replica = %v, want PermissionDenied", err)
	}

	const reason = "drill: suspected compromise"
	args := append([]string{"seal", "--fleet", "--distributor", strings.Join(addrs, ","), "--rootkms", root.API, "--reason", reason}, w.IDFlags(framework.Officer(1))...)
	r := w.SafeOK(args...)
	if !strings.Contains(r.Stdout, "fleet sealed") || !strings.Contains(r.Stdout, "root key dropped") {
		t.Errorf("safe seal --fleet printed %q, want the fleet sealed and the root key dropped", r.Stdout)
	}
	sealedAt := time.Now()
	for time.Since(sealedAt) < holdSealed {
		for _, d := range ds {
			st, err := d.Status()
			if err != nil || st.GetState() != sealed || !st.GetEmergencySealed() {
				t.Fatalf("GetStatus(%s) %s after the emergency seal = %v, %v; want SEALED, emergency", d.Name, time.Since(sealedAt).Round(time.Millisecond), st, err)
			}
		}
		if st, err := root.Status(); err != nil || st.GetHasRootKey() {
			t.Fatalf("root KMS status %s after the emergency seal = %v, %v; want no root key", time.Since(sealedAt).Round(time.Millisecond), st, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, d := range ds {
		if _, _, err := d.FetchRootKey(framework.RootKMS, m.GetGenesisId()); status.Code(err) != codes.FailedPrecondition {
			t.Errorf("FetchRootKey(%s) while emergency-sealed = %v, want FailedPrecondition", d.Name, err)
		}
		if !hasAuditRecord(d.Audit(), framework.Officer(1), "distributor/emergency-seal", audit.OutcomeOK) {
			t.Errorf("audit log of %s: no emergency-seal record by %s", d.Name, framework.Officer(1))
		}
	}
	if _, _, err := root.UnwrapRegionKey(kms, "us-east"); status.Code(err) != codes.Unavailable {
		t.Errorf("UnwrapRegionKey while the root key is dropped = %v, want Unavailable", err)
	}
	if !hasAuditRecord(root.Audit(), framework.Officer(1), "/cairn.rootkms.v1.RootKMS/DropRootKey", audit.OutcomeOK) {
		t.Errorf("audit log of %s: no DropRootKey record by %s", root.ID, framework.Officer(1))
	}

	// A 2-of-3 ceremony on one distributor brings the chain back.
	id := w.OpenCeremony(ds[0], 2)
	release(t, w, ds[0], id, safes, 2)
	release(t, w, ds[0], id, safes, 3)
	st := waitUnsealed(t, ds[0], m)
	requireUnsealedBy(t, ds[0], st, "ceremony:"+id)
	if st.GetEmergencySealed() {
		t.Errorf("GetStatus(%s) after the ceremony: still emergency-sealed", ds[0].Name)
	}
	root.WaitServing()
	if _, _, err := root.UnwrapRegionKey(kms, "us-east"); err != nil {
		t.Errorf("UnwrapRegionKey after the ceremony = %v", err)
	}
	// The other distributors stay emergency-sealed until their own
	// ceremony (or a restart, which forgets the state and fetches from the
	// unsealed one).
	if st, err := ds[1].Status(); err != nil || st.GetState() != sealed || !st.GetEmergencySealed() {
		t.Errorf("GetStatus(%s) = %v, %v; want still emergency-sealed", ds[1].Name, st, err)
	}
	ds[1].Kill()
	ds[1].Restart()
	requireUnsealedBy(t, ds[1], waitUnsealed(t, ds[1], m), "peer:")

	// No secret in any file: the region key the replica served before and
	// after the seal, the RMK, the shares, the passphrases.
	keys := regionKeysOf(t, root, "us-east")
	root.Stop()
	for _, d := range ds {
		d.Stop()
	}
	requireNoSecrets(t, w, m, safes, nil, regionKeySecrets(t, keys))
}
