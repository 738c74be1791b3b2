package kms_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/kms"
	"github.com/cairnkms/cairn/kms/kmstest"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
	"github.com/cairnkms/cairn/rootkms/rootkmstest/live"
)

// TestWithRealRootKMS runs the chain in-process: file safes, genesis, a
// distributor holding the RMK, a root KMS replica, and two KMS servers that
// fetch the region key with UnwrapRegionKey (HPKE). With the root KMS and
// the distributor stopped, both keep serving; a KMS restarted then stays
// not ready and says why, while the other keeps serving.
func TestWithRealRootKMS(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)

	// Genesis into two file safes, a distributor provisioned with the RMK,
	// one root KMS replica.
	chain := live.Start(t, pki)
	rootAddr := chain.Addr

	// regionctl's part: a region, a keyset made inside the root KMS, a bundle.
	rc := rootkmsclient.New(pki.Source(adminID), []string{rootAddr})
	defer rc.Close()
	var ks *rootkmsv1.Keyset
	// One write per Do: every attempt of a Do carries one request ID.
	err := rc.Do(ctx(t), func(ctx context.Context, c rootkmsv1.RootKMSClient) error {
		_, err := c.CreateRegion(ctx, &rootkmsv1.CreateRegionRequest{Region: region})
		return err
	})
	if err != nil {
		t.Fatalf("CreateRegion = %v", err)
	}
	err = rc.Do(ctx(t), func(ctx context.Context, c rootkmsv1.RootKMSClient) error {
		var err error
		ks, err = c.CreateKeyset(ctx, &rootkmsv1.CreateKeysetRequest{Name: ledger, Regions: []string{region},
			CiphertextTtl: durationpb.New(24 * time.Hour), RotationPeriod: durationpb.New(720 * time.Hour)})
		return err
	})
	if err != nil {
		t.Fatalf("CreateKeyset = %v", err)
	}
	copies := ks.GetRecord().GetCopies()
	if len(copies) != 1 || copies[0].GetRegion() != region {
		t.Fatalf("CreateKeyset copies = %v, want one for %s", copies, region)
	}
	ek := copies[0]
	signer := kmstest.NewSigner(t)
	sb := signer.Sign(t, &bundlev1.Bundle{
		FormatVersion: bundle.FormatVersion, Region: region, Serial: 1, RegionKeyVersions: []uint32{ek.GetRegionKeyVersion()},
		CreatedAt: timestamppb.Now(), NotAfter: timestamppb.New(time.Now().Add(bundle.DefaultValidity)), CreatedBy: adminID,
		Keysets: []*bundlev1.KeysetConfig{{
			Name: ledger, OwnerTeam: "payments", Purpose: bundlev1.Purpose_PURPOSE_ENVELOPE, Keyset: ek,
			Acl: kmstest.ACL("client/us-east/app"), RotationPeriod: durationpb.New(720 * time.Hour),
			CiphertextTtl: durationpb.New(24 * time.Hour), Regions: []string{region},
		}},
	})

	// Two KMS servers of the region, with the root KMS as their region keys.
	e := &env{t: t, pki: pki, signer: signer}
	withRoot := func() serverOpt {
		return func(c *kms.Config) {
			rk := kms.NewRootKMSRegionKeys(c.Source, []string{rootAddr})
			t.Cleanup(rk.Close)
			c.RegionKeys = rk
			c.FetchTimeout = 2 * time.Second
		}
	}
	aDir := t.TempDir()
	a := e.start(kms1ID, aDir, withRoot())
	b := e.start(kms2ID, "", withRoot())
	e.apply(a, sb)
	e.apply(b, sb)
	ca, cb := e.client(appID, a), e.client(appID, b)
	enc := encrypt(t, ca, ledger, []byte("dek"), []byte("ad"))
	if got := decrypt(t, cb, ledger, enc.GetCiphertext(), []byte("ad")).GetPlaintext(); string(got) != "dek" {
		t.Fatalf("Decrypt on the other server = %q", got)
	}

	// The root KMS and the distributor go away: serving goes on.
	chain.StopRoot()
	chain.StopDistributor()
	for i := range 50 {
		c := []kmsv1.KMSClient{ca, cb}[i%2]
		r := encrypt(t, c, ledger, fmt.Appendf(nil, "dek-%d", i), nil)
		if got := decrypt(t, []kmsv1.KMSClient{ca, cb}[(i+1)%2], ledger, r.GetCiphertext(), nil).GetPlaintext(); string(got) != fmt.Sprintf("dek-%d", i) {
			t.Fatalf("round %d with the root KMS down = %q", i, got)
		}
	}

	// A restarted KMS cannot fetch the region key: not ready, and says so.
	a.Close()
	a2 := e.start(kms1ID, aDir, withRoot())
	deadline := time.Now().Add(20 * time.Second)
	for {
		st, reason := a2.State()
		if st == kmsv1.ServingState_SERVING_STATE_NOT_READY && strings.Contains(reason, "UnwrapRegionKey") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("restarted KMS state = %v (%s), want NOT_READY naming UnwrapRegionKey", st, reason)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := e.client(appID, a2).Decrypt(ctx(t), &kmsv1.DecryptRequest{Keyset: ledger, Ciphertext: enc.GetCiphertext(), AssociatedData: []byte("ad")}); status.Code(err) != codes.Unavailable {
		t.Errorf("Decrypt on the restarted KMS = %v, want Unavailable", err)
	}
	if got := decrypt(t, cb, ledger, enc.GetCiphertext(), []byte("ad")).GetPlaintext(); string(got) != "dek" {
		t.Errorf("Decrypt on the surviving KMS = %q", got)
	}
}
