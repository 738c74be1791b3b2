package distributor_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/distributor"
	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/secret"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/safe/officer"
)

// failOnce fails the first record of operation op and writes everything
// else to l.
func failOnce(l *audit.Log, op string) (func(context.Context, audit.Record) error, *atomic.Int32) {
	var failed atomic.Int32
	return func(ctx context.Context, r audit.Record) error {
		if r.Operation == op && failed.CompareAndSwap(0, 1) {
			return errors.New("no space left on device")
		}
		return l.Write(ctx, r)
	}, &failed
}

// TestInstallFailureKeepsCeremonyRetryable: when the shares combine but the
// key cannot be installed (the unseal record cannot be written: fail
// closed), the ceremony stays open with the other shares, and the officer
// whose share completed it submits again.
func TestInstallFailureKeepsCeremonyRetryable(t *testing.T) {
	w := newWorld(t, 2, 3)
	dir := filepath.Join(w.dir, "distributor-1")
	if err := safe.WriteManifest(filepath.Join(dir, "genesis.json"), w.manifest); err != nil {
		t.Fatal(err)
	}
	log, err := audit.Open(filepath.Join(dir, "audit.log"), audit.Options{})
	if err != nil {
		t.Fatal(err)
	}
	d := w.startWith(dir, "distributor-1", nil, log)
	d.onStop = append(d.onStop, func() { log.Close() })
	hook, failed := failOnce(log, "distributor/unseal")
	distributor.SetAuditHook(d.srv, hook)

	c := w.openUnseal(d.addr)
	if _, err := w.release(d.addr, c.GetId(), 0); err != nil {
		t.Fatalf("release share 1 = %v", err)
	}
	if _, err := w.release(d.addr, c.GetId(), 1); status.Code(errors.Unwrap(err)) != codes.Unavailable || failed.Load() != 1 {
		t.Fatalf("release share 2 with the unseal record failing = %v, want Unavailable", err)
	}
	if !d.srv.Sealed() {
		t.Fatal("unsealed although the unseal could not be audited")
	}
	got, err := w.client(d.addr, officerID(1)).GetCeremony(ctx(t), &distributorv1.GetCeremonyRequest{CeremonyId: c.GetId()})
	if err != nil || got.GetState() != distributorv1.CeremonyState_CEREMONY_STATE_OPEN || !slices.Equal(got.GetAcceptedIndices(), []uint32{1}) {
		t.Fatalf("GetCeremony after the failed install = %v, %v; want OPEN with share 1 accepted", got, err)
	}
	// The same officer submits again: the ceremony completes.
	got, err = w.release(d.addr, c.GetId(), 1)
	if err != nil || got.GetState() != distributorv1.CeremonyState_CEREMONY_STATE_SUCCEEDED {
		t.Fatalf("release share 2 again = %v, %v; want SUCCEEDED", got, err)
	}
	if d.srv.Sealed() {
		t.Fatal("still sealed after the retried share")
	}
	recs, err := audit.ReadFile(d.auditLog)
	if err != nil {
		t.Fatal(err)
	}
	unseals := 0
	for _, r := range recs {
		if r.Operation == "distributor/unseal" {
			unseals++
		}
	}
	if unseals != 1 {
		t.Errorf("distributor/unseal records = %d, want 1", unseals)
	}
}

// TestEmergencySealHolds: an emergency seal keeps a fleet sealed (no peer
// fetch, no hand-out) past many peer loop periods, refuses a provisioning,
// and only an unseal ceremony lifts it.
func TestEmergencySealHolds(t *testing.T) {
	w := newWorld(t, 2, 3)
	// Each is the other's peer.
	var lis [2]net.Listener
	var dirs [2]string
	for i := range lis {
		var err error
		if lis[i], err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		dirs[i] = filepath.Join(w.dir, fmt.Sprintf("distributor-%d", i+1))
		if err := safe.WriteManifest(filepath.Join(dirs[i], "genesis.json"), w.manifest); err != nil {
			t.Fatal(err)
		}
	}
	d1 := w.startIn(dirs[0], "distributor-1", lis[0], lis[1].Addr().String())
	d2 := w.startIn(dirs[1], "distributor-2", lis[1], lis[0].Addr().String())
	if err := officer.Provision(ctx(t), w.client(d1.addr, officerID(1)), w.manifest, w.rmk); err != nil {
		t.Fatal(err)
	}
	if err := d2.srv.WaitUnsealed(ctx(t)); err != nil {
		t.Fatal(err)
	}
	// A plain seal is undone by the peer loop (the control).
	if _, err := w.client(d2.addr, officerID(1)).Seal(ctx(t), &distributorv1.SealRequest{Reason: "drill"}); err != nil {
		t.Fatal(err)
	}
	if err := d2.srv.WaitUnsealed(ctx(t)); err != nil {
		t.Fatalf("a plainly sealed distributor did not unseal from its peer: %v", err)
	}
	for _, d := range []*node{d2, d1} {
		if _, err := w.client(d.addr, officerID(2)).Seal(ctx(t), &distributorv1.SealRequest{Reason: "compromise suspected", Emergency: true}); err != nil {
			t.Fatalf("emergency Seal(%s) = %v", d.addr, err)
		}
	}
	time.Sleep(time.Second) // 5x the peer retry maximum
	for _, d := range []*node{d1, d2} {
		st, err := w.client(d.addr, officerID(1)).GetStatus(ctx(t), &distributorv1.GetStatusRequest{})
		if err != nil || st.GetState() != distributorv1.SealState_SEAL_STATE_SEALED || !st.GetEmergencySealed() {
			t.Errorf("status of %s after an emergency seal = %v, %v; want sealed, emergency", d.addr, st, err)
		}
		if _, err := w.fetch(d.addr, rootKMSID); status.Code(err) != codes.FailedPrecondition {
			t.Errorf("FetchRootKey(%s) while emergency-sealed = %v, want FailedPrecondition", d.addr, err)
		}
		if ready, why := d.srv.Readiness(); ready || !strings.Contains(why, "emergency-sealed") {
			t.Errorf("Readiness(%s) = %v, %q; want not ready, emergency-sealed", d.addr, ready, why)
		}
	}
	// A provisioning (one person with the key) does not lift it.
	if err := officer.Provision(ctx(t), w.client(d1.addr, officerID(1)), w.manifest, w.rmk); err == nil {
		t.Error("Provision of an emergency-sealed distributor succeeded; want it refused")
	}
	// An unseal ceremony does.
	c := w.openUnseal(d1.addr)
	for i := range 2 {
		if _, err := w.release(d1.addr, c.GetId(), i); err != nil {
			t.Fatalf("release share %d = %v", i+1, err)
		}
	}
	st, err := w.client(d1.addr, officerID(1)).GetStatus(ctx(t), &distributorv1.GetStatusRequest{})
	if err != nil || st.GetState() != distributorv1.SealState_SEAL_STATE_UNSEALED || st.GetEmergencySealed() {
		t.Errorf("status after the unseal ceremony = %v, %v; want unsealed, not emergency", st, err)
	}
	// d2 stays emergency-sealed (it needs its own ceremony, or a restart
	// that forgets the state and fetches from d1).
	time.Sleep(500 * time.Millisecond)
	if !d2.srv.Sealed() {
		t.Error("distributor-2 unsealed from its peer while emergency-sealed")
	}
	d2.stop()
	d2 = w.startIn(dirs[1], "distributor-2", nil, d1.addr)
	if err := d2.srv.WaitUnsealed(ctx(t)); err != nil {
		t.Errorf("restarted distributor-2 did not fetch from the ceremony-unsealed peer: %v", err)
	}
	recs, err := audit.ReadFile(d1.auditLog)
	if err != nil {
		t.Fatal(err)
	}
	var ops []string
	for _, r := range recs {
		if r.Operation == "distributor/emergency-seal" {
			ops = append(ops, r.Identity+" "+r.Reason)
		}
	}
	if want := []string{officerID(2) + " compromise suspected"}; !slices.Equal(ops, want) {
		t.Errorf("emergency-seal audit records = %q, want %q", ops, want)
	}
}

// newSafes opens n fresh file safes for a rekey.
func (w *world) newSafes(n int) []safe.Safe {
	w.t.Helper()
	var out []safe.Safe
	for i := range n {
		s, err := safe.OpenFileSafe(safe.FileSafeConfig{
			Dir: filepath.Join(w.dir, "new-safes", fmt.Sprintf("new-%d", i+1)), Label: fmt.Sprintf("new-%d", i+1),
			Passphrase: secret.New([]byte("test passphrase")), KDFMemoryKiB: 8 * 1024, AttemptDir: filepath.Join(w.dir, "attempts"),
		})
		if err != nil {
			w.t.Fatal(err)
		}
		w.t.Cleanup(func() { s.Close() })
		out = append(out, s)
	}
	return out
}

// TestRekeyCeremony: officers release their shares into a rekey ceremony;
// the distributor re-splits the key to the new safes; the new manifest is
// installed (verified) on the fleet, unseals a distributor from the new
// shares, and every step is audited.
func TestRekeyCeremony(t *testing.T) {
	w := newWorld(t, 2, 3)
	d1 := w.start("distributor-1", false)
	if err := officer.Provision(ctx(t), w.client(d1.addr, officerID(1)), w.manifest, w.rmk); err != nil {
		t.Fatal(err)
	}
	d2 := w.start("distributor-2", true) // sealed, pinned to epoch 0
	news := w.newSafes(4)
	newOfficers := []string{officerID(1), officerID(2), officerID(3), officerID(4)}
	admin := w.client(d1.addr, officerID(1))

	// A bad plan is refused.
	if _, err := officer.OpenRekey(ctx(t), admin, 5, news, newOfficers, time.Minute); err == nil {
		t.Error("OpenRekey 5-of-4 succeeded; want it refused")
	}
	r, err := officer.OpenRekey(ctx(t), admin, 3, news, newOfficers, time.Minute)
	if err != nil {
		t.Fatalf("OpenRekey = %v", err)
	}
	defer r.Close()
	if _, err := r.Finish(ctx(t), admin, w.manifest); err == nil {
		t.Error("Finish before the threshold succeeded; want it refused")
	}
	for i := range 2 {
		if _, err := w.release(d1.addr, r.CeremonyID, i); err != nil {
			t.Fatalf("release share %d into the rekey = %v", i+1, err)
		}
	}
	m2, err := r.Finish(ctx(t), admin, w.manifest)
	if err != nil {
		t.Fatalf("Finish = %v", err)
	}
	// Anyone may watch the ceremony; only officers get the sealed shares.
	for _, who := range []struct {
		id     string
		shares bool
	}{{officerID(2), true}, {rootKMSID, false}} {
		c, err := w.client(d1.addr, who.id).GetCeremony(ctx(t), &distributorv1.GetCeremonyRequest{CeremonyId: r.CeremonyID})
		if err != nil || (len(c.GetRekeyedShares()) > 0) != who.shares || len(c.GetRekeyedManifest()) == 0 {
			t.Errorf("GetCeremony(rekey) as %s = %d sealed shares, manifest %d bytes, %v; want shares %v and the manifest", who.id, len(c.GetRekeyedShares()), len(c.GetRekeyedManifest()), err, who.shares)
		}
	}
	if m2.GetEpoch() != 1 || m2.GetThreshold() != 3 || len(m2.GetSlots()) != 4 || !bytes.Equal(m2.GetKcv(), w.manifest.GetKcv()) {
		t.Fatalf("rekeyed manifest = %v, want epoch 1, 3-of-4, same KCV", m2)
	}
	rmk, err := safe.Recover(ctx(t), m2, news[1:])
	if err != nil || !rmk.Equal(w.rmk) {
		t.Fatalf("Recover from 3 new safes = %v, want the RMK", err)
	}
	rmk.Wipe()

	// Install: verified, idempotent, and the chain is enforced.
	for _, d := range []*node{d1, d2} {
		changed, err := officer.InstallManifest(ctx(t), w.client(d.addr, officerID(2)), m2)
		if err != nil || !changed {
			t.Fatalf("InstallManifest(%s) = %v, %v; want changed", d.addr, changed, err)
		}
		if changed, err := officer.InstallManifest(ctx(t), w.client(d.addr, officerID(2)), m2); err != nil || changed {
			t.Errorf("InstallManifest(%s) again = %v, %v; want unchanged", d.addr, changed, err)
		}
		pinned, err := safe.ReadManifest(filepath.Join(d.dir, "genesis.json"))
		if err != nil || !proto.Equal(pinned, m2) {
			t.Errorf("pinned manifest of %s = %v, %v; want the rekeyed one", d.addr, pinned, err)
		}
	}
	skipped := proto.Clone(m2).(*safev1.GenesisManifest)
	skipped.Epoch = 3
	if _, err := officer.InstallManifest(ctx(t), w.client(d1.addr, officerID(2)), skipped); status.Code(errors.Unwrap(err)) != codes.FailedPrecondition {
		t.Errorf("InstallManifest of epoch 3 over epoch 1 = %v, want FailedPrecondition", err)
	}
	if _, err := officer.InstallManifest(ctx(t), w.client(d1.addr, rootKMSID), m2); status.Code(errors.Unwrap(err)) != codes.PermissionDenied {
		t.Errorf("InstallManifest as a root KMS replica = %v, want PermissionDenied", err)
	}

	// The new shares unseal d2; the old ones no longer do.
	c := w.openUnseal(d2.addr)
	if _, err := officer.Release(ctx(t), w.client(d2.addr, officerID(1)), c.GetId(), w.manifest, w.safes[0]); err == nil {
		t.Error("an old-epoch share was accepted after the rekey")
	}
	for i := 1; i < 4; i++ {
		if _, err := officer.Release(ctx(t), w.client(d2.addr, officerID(i+1)), c.GetId(), m2, news[i]); err != nil {
			t.Fatalf("release new share %d = %v", i+1, err)
		}
	}
	if d2.srv.Sealed() {
		t.Error("distributor-2 is sealed after an unseal ceremony with the new shares")
	}

	recs, err := audit.ReadFile(d1.auditLog)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, r := range recs {
		seen[r.Operation] = true
	}
	for _, op := range []string{"distributor/rekey", "distributor/install-manifest", "/cairn.distributor.v1.Distributor/SubmitShare", "/cairn.distributor.v1.Distributor/OpenCeremony"} {
		if !seen[op] {
			t.Errorf("no %s audit record on distributor-1", op)
		}
	}
	assertNoSecrets(t, w, w.dir+"/distributor-1")
}
