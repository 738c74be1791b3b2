package cli_test

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cairnkms/cairn/internal/identity/identitytest"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	"github.com/cairnkms/cairn/regionctl/cli"
	"github.com/cairnkms/cairn/regionctl/rollout"
	"google.golang.org/protobuf/proto"
)

const cardsKeyset = "payments/cards"

// addCardsTeam is lockoutTeam (us-east's demo client out of
// payments/ledger's ACL) plus a new keyset, payments/cards, in both regions,
// for every client of them: a change that adds a keyset and breaks an ACL.
func addCardsTeam() string {
	locked := []string{"client/us-east/batch", "client/eu-west/*"}
	open := []string{"client/us-east/*", "client/eu-west/*"}
	ks := func(name string, acl []string) map[string]any {
		return map[string]any{"name": name, "regions": []string{"eu-west", "us-east"}, "purpose": "envelope",
			"rotation_period": time.Hour.String(), "ciphertext_ttl": (2 * time.Hour).String(),
			"acl": map[string]any{"encrypt": acl, "decrypt": acl}}
	}
	b, _ := json.Marshal(map[string]any{"team": "payments", "keysets": []any{ks(fleetKeyset, locked), ks(cardsKeyset, open)}})
	return string(b)
}

// cardsCall encrypts (decrypt nil) or decrypts through k as the region's
// demo client with payments/cards.
func (e *fleetEnv) cardsCall(k *fleetKMS, decrypt []byte) ([]byte, error) {
	cc := e.dial(fmt.Sprintf("spiffe://%s/client/%s/app", identitytest.TrustDomain, k.region), k.addr)
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if decrypt != nil {
		r, err := kmsv1.NewKMSClient(cc).Decrypt(ctx, &kmsv1.DecryptRequest{Keyset: cardsKeyset, Ciphertext: decrypt})
		return r.GetPlaintext(), err
	}
	r, err := kmsv1.NewKMSClient(cc).Encrypt(ctx, &kmsv1.EncryptRequest{Keyset: cardsKeyset, Plaintext: []byte("card-dek")})
	return r.GetCiphertext(), err
}

// TestRolloutRollbackKeepsUsedKeyset: the change adds payments/cards and
// locks the demo client out of payments/ledger. While the canary bakes, the
// client encrypts with payments/cards (it works) and with payments/ledger
// (refused): the gate fails and the canary is rolled back. The rollback
// obeys the Safety Condition: payments/ledger's ACL is the last good one
// again, and payments/cards, which was used, is kept, so every ciphertext
// made with it on the canary still decrypts there. The rollback is not
// RollbackFailed.
func TestRolloutRollbackKeepsUsedKeyset(t *testing.T) {
	e := newRolloutEnv(t)
	c1, c2, w := e.kms["us-east"][0], e.kms["us-east"][1], e.kms["eu-west"][0]
	writeFile(t, filepath.Join(e.teams, "payments.json"), addCardsTeam())
	e.mustRC("keyset", "create")
	us := e.buildBundle("us-east", "--force-shrink", "--reason", "test: add cards, lock the demo client out of the ledger")
	eu := e.buildBundle("eu-west", "--force-shrink", "--reason", "test: add cards, lock the demo client out of the ledger")
	store := cli.NewMemRollouts(e.clk.Now)

	var cts [][]byte
	ledgerRefused := 0
	traffic := func(time.Duration) {
		for range 5 {
			ct, err := e.cardsCall(c1, nil)
			if err != nil {
				t.Errorf("Encrypt with %s on the canary during the bake = %v", cardsKeyset, err)
				continue
			}
			cts = append(cts, ct)
			if e.tryEncrypt(c1) != nil {
				ledgerRefused++
			}
		}
	}
	r := e.rollout(store, traffic, "start", "--bundles", us+","+eu, "--regions", "us-east,eu-west", "--bake", rolloutBake.String(),
		"--reason", "add cards, tighten the ledger ACL", "--id", "rb1")
	if r.code != 1 {
		t.Fatalf("rollout start = %d, want 1 (halted)\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
	if len(cts) != 5 || ledgerRefused != 5 {
		t.Fatalf("during the bake: %d cards ciphertexts, ledger refused %d times; want 5 and 5", len(cts), ledgerRefused)
	}
	contains(t, "rollout start stdout", r.stdout, "HALTED: stage 1/3 canary failed its gates",
		"rollback of us-east: keyset "+cardsKeyset+", added by the change, is kept as the change serves it",
		"rolled back: every server that applied serves its last good content again")
	if strings.Contains(r.stdout+r.stderr, "rollback failed") || strings.Contains(r.stderr, "REFUSED") {
		t.Errorf("the rollback was refused or failed:\nstdout:\n%s\nstderr:\n%s", r.stdout, r.stderr)
	}
	rec := storedRecord(t, store, "rb1")
	if rec.Phase != rollout.PhaseRolledBack {
		t.Fatalf("record phase %s, want rolled-back\n%s", rec.Phase, rollout.Status(rec))
	}
	if sr := rec.Servers[c1.addr]; sr.Applied != 2 || sr.RolledBack != 3 {
		t.Errorf("canary result %+v, want applied 2, rolled back at 3", sr)
	}
	// The rollback says what it is, signed: a shrink override naming it
	// (going back to served content is an intended shrink of the change).
	{
		cc := e.dial(regionctlID, c1.addr)
		st, err := kmsv1.NewKMSAdminClient(cc).GetStatus(context.Background(), &kmsv1.GetStatusRequest{IncludeBundle: true})
		cc.Close()
		var b bundlev1.Bundle
		if err != nil || proto.Unmarshal(st.GetServedBundle().GetBundle(), &b) != nil || !strings.Contains(b.GetShrinkOverride().GetReason(), "rollback of rollout rb1") {
			t.Errorf("the canary's rollback bundle: shrink override %q, %v; want one naming rollout rb1", b.GetShrinkOverride().GetReason(), err)
		}
	}
	if got := e.serial(c1); got != 3 {
		t.Errorf("the canary serves serial %d, want the rollback's 3", got)
	}
	// The ledger's ACL is rolled back: the demo client is served again.
	if err := e.tryEncrypt(c1); err != nil {
		t.Errorf("Encrypt with %s on the canary after the rollback = %v, want the demo client served again", fleetKeyset, err)
	}
	// payments/cards was kept: every ciphertext made with it decrypts.
	for i, ct := range cts {
		if pt, err := e.cardsCall(c1, ct); err != nil || string(pt) != "card-dek" {
			t.Errorf("Decrypt of cards ciphertext %d on the canary after the rollback = %q, %v; want card-dek", i, pt, err)
		}
	}
	for _, k := range []*fleetKMS{c2, w} {
		if got := e.serial(k); got != 1 {
			t.Errorf("%s/%s serves serial %d, want 1 (never received the change)", k.region, k.name, got)
		}
	}
}
