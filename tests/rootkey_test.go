package tests

import (
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/audit"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	"github.com/cairnkms/cairn/safe/pkcs11safe/softhsmtest"
	"github.com/cairnkms/cairn/tests/framework"
)

const fetchRootKeyOp = "/cairn.distributor.v1.Distributor/FetchRootKey"

// maxRejoin is how soon a restarted distributor must have the key again
// from a live peer ("rejoin within a few seconds"; it takes about 0.1s).
const maxRejoin = 5 * time.Second

// TestFleetSurvivesAndConverges: three distributors provisioned at genesis
// serve one key; two killed with -9 leave the survivor serving, and rejoin
// from it; all three killed stay sealed until a 3-of-5 ceremony on one of
// them, from which the others converge.
func TestFleetSurvivesAndConverges(t *testing.T) {
	w := framework.NewWorld(t, bin)
	safes := w.FileSafes(5)
	ds := w.Distributors(3, true)
	for _, d := range ds {
		d.Start()
	}
	for _, d := range ds {
		d.WaitState(sealed) // serving, unprovisioned
	}

	m := w.Genesis(3, safes, ds...)
	for _, d := range ds {
		st := waitUnsealed(t, d, m)
		requireUnsealedBy(t, d, st, "genesis:")
	}
	rmk := fetchRMK(t, ds[0], m)
	defer clear(rmk)
	requireSameRMK(t, m, rmk, ds...)

	// Two of three die: the survivor keeps serving.
	ds[1].Kill()
	ds[2].Kill()
	requireSameRMK(t, m, rmk, ds[0])

	// They come back and fetch the key from the survivor: no safe needed.
	restart := time.Now()
	ds[1].Restart()
	ds[2].Restart()
	for _, d := range ds[1:] {
		st := waitUnsealed(t, d, m)
		took := time.Since(restart)
		requireUnsealedBy(t, d, st, "peer:")
		t.Logf("%s: unsealed from a peer %s after restart (%s)", d.Name, took.Round(time.Millisecond), st.GetUnsealedBy())
		if took > maxRejoin {
			t.Errorf("%s: rejoin took %s, want at most %s", d.Name, took, maxRejoin)
		}
	}
	requireSameRMK(t, m, rmk, ds...)
	// The survivor handed the key to each of them over mTLS, on record.
	recs := ds[0].Audit()
	for _, d := range ds[1:] {
		if !hasAuditRecord(recs, d.Name, fetchRootKeyOp, audit.OutcomeOK) {
			t.Errorf("audit log of %s: no ok FetchRootKey record for %s", ds[0].Name, d.Name)
		}
	}

	// All die: nobody holds the key, so all stay sealed.
	for _, d := range ds {
		d.Kill()
	}
	for _, d := range ds {
		d.Restart()
	}
	for _, d := range ds {
		d.WaitState(sealed)
	}
	// Sealed is not yet "stays sealed": wait until each has asked every peer
	// for the key and found it sealed too.
	for _, d := range ds {
		d.WaitStatus("seeing every peer sealed", func(st *distributorv1.GetStatusResponse) bool {
			if len(st.GetPeers()) != len(ds)-1 {
				return false
			}
			for _, p := range st.GetPeers() {
				if p.GetState() != sealed || p.GetLastSeen() == nil {
					return false
				}
			}
			return true
		})
	}
	for _, d := range ds {
		st, err := d.Status()
		if err != nil || st.GetState() != sealed {
			t.Fatalf("GetStatus(%s) after a full restart = %v, %v, want SEALED", d.Name, st.GetState(), err)
		}
		if _, _, err := d.FetchRootKey(framework.RootKMS, m.GetGenesisId()); status.Code(err) != codes.FailedPrecondition {
			t.Errorf("FetchRootKey(%s, sealed) = %v, want FailedPrecondition", d.Name, err)
		}
	}

	// A ceremony on one brings back the fleet.
	ceremonyStart := time.Now()
	id := w.OpenCeremony(ds[0], 1)
	release(t, w, ds[0], id, safes, 1)
	release(t, w, ds[0], id, safes, 3)
	if st, err := ds[0].Status(); err != nil || st.GetState() != sealed {
		t.Fatalf("GetStatus(%s) with 2 of 3 shares = %v, %v, want SEALED", ds[0].Name, st.GetState(), err)
	}
	if r := release(t, w, ds[0], id, safes, 5); !strings.Contains(r.Stdout, "SUCCEEDED") {
		t.Errorf("third release printed %q, want the ceremony SUCCEEDED", r.Stdout)
	}
	st := waitUnsealed(t, ds[0], m)
	requireUnsealedBy(t, ds[0], st, "ceremony:"+id)
	unsealedAt := time.Now()
	t.Logf("%s: ceremony (open + 3 releases) took %s", ds[0].Name, unsealedAt.Sub(ceremonyStart).Round(time.Millisecond))
	for _, d := range ds[1:] {
		st := waitUnsealed(t, d, m)
		requireUnsealedBy(t, d, st, "peer:")
		t.Logf("%s: converged from a peer %s after the ceremony (%s)", d.Name, time.Since(unsealedAt).Round(time.Millisecond), st.GetUnsealedBy())
	}
	requireSameRMK(t, m, rmk, ds...)

	for _, d := range ds {
		d.Stop()
	}
	requireNoKeyMaterial(t, w, m, safes, rmk)
}

// TestKilledMidCeremony: a distributor killed with two of three shares in
// restarts sealed with no trace of the ceremony, in memory or on disk.
func TestKilledMidCeremony(t *testing.T) {
	w := framework.NewWorld(t, bin)
	safes := w.FileSafes(5)
	d := w.Distributors(1, false)[0]
	d.Start()
	d.WaitState(sealed)
	m := w.Genesis(3, safes, d)
	waitUnsealed(t, d, m)
	rmk := fetchRMK(t, d, m)
	defer clear(rmk)
	d.Kill()
	d.Restart()
	d.WaitState(sealed)

	id := w.OpenCeremony(d, 1)
	release(t, w, d, id, safes, 1)
	release(t, w, d, id, safes, 2)
	if got, want := acceptedIndices(t, d, id), []uint32{1, 2}; !slices.Equal(got, want) {
		t.Fatalf("GetCeremony(%s).AcceptedIndices = %v, want %v", id, got, want)
	}

	d.Kill()
	d.Restart()
	st, _ := d.WaitState(sealed)
	if st.GetCeremony() != nil {
		t.Errorf("GetStatus().Ceremony after kill -9 = %v, want none", st.GetCeremony())
	}
	if _, err := d.Ceremony(id); status.Code(err) != codes.NotFound {
		t.Errorf("GetCeremony(%s) after kill -9 = %v, want NotFound", id, err)
	}
	if r := w.Release(d, id, framework.Officer(3), safes[2]); r.ExitCode == 0 || !strings.Contains(r.Stderr, "NotFound") {
		t.Errorf("release into the killed ceremony = exit %d, %q, want a NotFound failure", r.ExitCode, r.Stderr)
	}
	requireOnlyPublicState(t, d)

	// A new ceremony starts from nothing and still works.
	id2 := w.OpenCeremony(d, 2)
	if got := acceptedIndices(t, d, id2); len(got) != 0 || id2 == id {
		t.Errorf("new ceremony %s: AcceptedIndices = %v, want none (and a new id, old %s)", id2, got, id)
	}
	for _, i := range []int{3, 4, 5} {
		release(t, w, d, id2, safes, i)
	}
	st = waitUnsealed(t, d, m)
	requireUnsealedBy(t, d, st, "ceremony:"+id2)
	requireSameRMK(t, m, rmk, d)

	d.Stop()
	requireOnlyPublicState(t, d)
	requireNoKeyMaterial(t, w, m, safes, rmk)
}

// TestRefusalsAcrossProcesses: identities that may not have the key or may
// not take part in a ceremony are refused by the running server, audited,
// and change nothing; no file holds the RMK, a share or a passphrase.
func TestRefusalsAcrossProcesses(t *testing.T) {
	w := framework.NewWorld(t, bin)
	safes := w.FileSafes(5)
	d := w.Distributors(1, false)[0]
	d.Start()
	d.WaitState(sealed)
	m := w.Genesis(3, safes, d)
	waitUnsealed(t, d, m)

	fetches := []struct {
		as   string
		want codes.Code
	}{
		{"kms/us-east/kms-1", codes.PermissionDenied},
		{"officer/global/officer-2", codes.PermissionDenied},
		{"client/us-east/demo", codes.PermissionDenied},
		{framework.RootKMS, codes.OK},
		{"distributor/global/distributor-2", codes.OK}, // a peer
	}
	for _, f := range fetches {
		rmk, _, err := d.FetchRootKey(f.as, m.GetGenesisId())
		if got := status.Code(err); got != f.want {
			t.Errorf("FetchRootKey(as %s) = %v, want %v", f.as, err, f.want)
		}
		if f.want != codes.OK && !rmk.IsZero() {
			t.Errorf("FetchRootKey(as %s) returned key material", f.as)
		}
		rmk.Wipe()
	}
	recs := d.Audit()
	for _, f := range fetches {
		want := audit.OutcomeOK
		if f.want != codes.OK {
			want = audit.OutcomeDenied
		}
		if !hasAuditRecord(recs, f.as, fetchRootKeyOp, want) {
			t.Errorf("audit log of %s: no %q record of %s calling FetchRootKey", d.Name, want, f.as)
		}
	}
	for _, r := range recs {
		if r.Operation == fetchRootKeyOp && r.Outcome == audit.OutcomeDenied && r.Code != codes.PermissionDenied.String() {
			t.Errorf("audit record %+v: code %q, want %q", r, r.Code, codes.PermissionDenied.String())
		}
	}

	// A ceremony with one share in: refused releases leave it as it was.
	d.Kill()
	d.Restart()
	d.WaitState(sealed)
	id := w.OpenCeremony(d, 1)
	release(t, w, d, id, safes, 1)
	releases := []struct {
		as   string
		safe int
		want string
	}{
		{"client/us-east/demo", 2, "PermissionDenied"},              // not an officer
		{"kms/us-east/kms-1", 3, "PermissionDenied"},                // not an officer
		{framework.Officer(4), 2, "PermissionDenied"},               // share 2 is officer-2's
		{framework.Officer(1), 1, "AlreadyExists"},                  // officer-1 again
		{"distributor/global/distributor-2", 2, "PermissionDenied"}, // a peer is no officer
	}
	for _, r := range releases {
		res := w.Release(d, id, r.as, safes[r.safe-1])
		if res.ExitCode != 1 || !strings.Contains(res.Stderr, "code = "+r.want) {
			t.Errorf("release(as %s, safe-%d) = exit %d, %q, want exit 1 with %s", r.as, r.safe, res.ExitCode, res.Stderr, r.want)
		}
		if got, want := acceptedIndices(t, d, id), []uint32{1}; !slices.Equal(got, want) {
			t.Fatalf("after release(as %s): AcceptedIndices = %v, want %v", r.as, got, want)
		}
	}
	recs = d.Audit()
	for _, name := range []string{"client/us-east/demo", "kms/us-east/kms-1"} {
		if !hasAuditRecord(recs, name, "/cairn.distributor.v1.Distributor/SubmitShare", audit.OutcomeDenied) {
			t.Errorf("audit log of %s: no denied SubmitShare record for %s", d.Name, name)
		}
	}
	// The refusals did not spoil the ceremony.
	release(t, w, d, id, safes, 2)
	release(t, w, d, id, safes, 3)
	waitUnsealed(t, d, m)
	d.Stop()
	requireNoKeyMaterial(t, w, m, safes, nil)
}

// TestSoftHSMCeremony: genesis into five SoftHSM2 tokens, then an unseal
// ceremony from tokens 2, 4 and 5 after a kill -9, all in separate
// processes.
func TestSoftHSMCeremony(t *testing.T) {
	env := softhsmtest.New(t) // before any process loads the module
	w := framework.NewWorld(t, bin)
	safes := w.PKCS11Safes(env, 5)
	d := w.Distributors(1, false)[0]
	d.Start()
	d.WaitState(sealed)
	m := w.Genesis(3, safes, d)
	for _, s := range m.GetSlots() {
		if s.GetSafeKind() != "pkcs11" {
			t.Errorf("manifest slot %d: safe kind %q, want pkcs11", s.GetIndex(), s.GetSafeKind())
		}
	}
	waitUnsealed(t, d, m)
	rmk := fetchRMK(t, d, m)
	defer clear(rmk)

	d.Kill()
	d.Restart()
	d.WaitState(sealed)
	start := time.Now()
	id := w.OpenCeremony(d, 2)
	for _, i := range []int{2, 4, 5} {
		release(t, w, d, id, safes, i)
	}
	st := waitUnsealed(t, d, m)
	took := time.Since(start)
	requireUnsealedBy(t, d, st, "ceremony:"+id)
	requireSameRMK(t, m, rmk, d)
	t.Logf("SoftHSM2 ceremony (open, 3 token releases, unsealed): %s", took.Round(time.Millisecond))

	d.Stop()
	requireNoKeyMaterial(t, w, m, safes, rmk, env.Dir())
}
