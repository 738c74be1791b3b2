package framework

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/safe/safeconfig"
)

// RequireNoSecrets recovers the RMK in this process from the threshold of
// the safes, unseals every share, and scans every file under the world's
// directory and the extra roots (state dirs, audit logs, every process's
// stdout and stderr, manifests, configs, and the safes' own storage and
// token files) for any of them, raw or encoded, and for each safe's PIN or
// passphrase (anywhere but its own file) and the extra secrets (region
// keys, for instance), failing the test for each one found. If wantRMK is
// not nil the recovered key must equal it. It clears the secrets' values
// when done.
func (w *World) RequireNoSecrets(m *safev1.GenesisManifest, safes []SafeConfig, wantRMK []byte, extra []Secret, extraRoots ...string) {
	w.T.Helper()
	// The scan must read what matters, or it proves nothing.
	for _, want := range []string{w.Logs, w.ManifestPath()} {
		if _, err := os.Stat(want); err != nil {
			w.T.Errorf("scan input %s missing: %v", want, err)
		}
	}
	RequireNoKeyMaterial(w.T, m, safes, wantRMK, extra, append([]string{w.Dir}, extraRoots...)...)
}

// RequireNoKeyMaterial is RequireNoSecrets for a chain no World wrote (one
// `cairn up` started): it opens the safes from their configs
// (SafeConfig.Path; Unlock is the PIN or passphrase that opens each, looked
// for everywhere but its own file), recovers the RMK from the threshold of
// them with m, unseals every share, and scans the roots for all of them and
// the extra secrets. Run it once the chain's processes have stopped.
func RequireNoKeyMaterial(t testing.TB, m *safev1.GenesisManifest, safes []SafeConfig, wantRMK []byte, extra []Secret, roots ...string) {
	t.Helper()
	ctx := context.Background()
	var opened []safe.Safe
	defer func() {
		for _, s := range opened {
			if err := s.Close(); err != nil {
				t.Errorf("closing safe %s: %v", s.Label(), err)
			}
		}
	}()
	for _, sc := range safes {
		s, err := safeconfig.OpenFile(ctx, sc.Path)
		if err != nil {
			t.Fatalf("safeconfig.OpenFile(%s) = %v", sc.Path, err)
		}
		opened = append(opened, s)
	}
	if len(opened) < int(m.GetThreshold()) {
		t.Fatalf("secret scan: %d safe(s), want at least the threshold %d to recover the RMK", len(opened), m.GetThreshold())
	}
	rmk, err := safe.Recover(ctx, m, opened[:m.GetThreshold()])
	if err != nil {
		t.Fatalf("safe.Recover(%d safes) = %v", m.GetThreshold(), err)
	}
	defer rmk.Wipe()
	secrets := []Secret{{Name: "RMK", Value: rmk.Data()}}
	if wantRMK != nil && !bytes.Equal(secrets[0].Value, wantRMK) {
		t.Errorf("safe.Recover gave another key than the distributors hand out")
	}
	for _, s := range opened {
		index, err := safe.SlotOf(m, s)
		if err != nil {
			t.Fatal(err)
		}
		share, err := s.Unseal(ctx, safe.ShareRef{GenesisID: m.GetGenesisId(), Epoch: m.GetEpoch(), Index: index})
		if err != nil {
			t.Fatalf("Unseal(%s, share %d) = %v", s.Label(), index, err)
		}
		secrets = append(secrets, Secret{Name: fmt.Sprintf("share %d (%s)", index, s.Label()), Value: share.Data()})
		share.Wipe()
	}
	defer func() {
		for _, s := range secrets {
			clear(s.Value)
		}
	}()
	nKeyMaterial := len(secrets)
	// Each safe's PIN or passphrase, anywhere but its own file.
	for _, sc := range safes {
		u := sc.Unlock
		secrets = append(secrets, Secret{Name: u.Name, Value: bytes.Clone(u.Value), Home: u.Home})
	}
	secrets = append(secrets, extra...)

	scanStart := time.Now()
	found, stats, err := Scan(roots, secrets)
	took := time.Since(scanStart)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range found {
		t.Errorf("key material on disk: %s", f)
	}
	if stats.Files < 20 {
		t.Errorf("Scan read %d files, want at least 20 (certs, safes, state, logs)", stats.Files)
	}
	t.Logf("secret scan: %d secrets (RMK + %d shares + %d PINs or passphrases + %d others) in %d encodings each, %d files, %d bytes, in %s: %d found",
		len(secrets), nKeyMaterial-1, len(safes), len(extra), len(Encodings(secrets[0].Value)), stats.Files, stats.Bytes, took.Round(time.Millisecond), len(found))
}
