package safe_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/secret"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
)

func fileSafes(t *testing.T, n int) []safe.Safe {
	t.Helper()
	dir := t.TempDir()
	out := make([]safe.Safe, n)
	for i := range out {
		out[i] = openFileSafe(t, dir, fmt.Sprintf("safe-%d", i+1))
	}
	return out
}

// subsets returns every k-subset of {0..n-1}.
func subsets(n, k int) [][]int {
	var out [][]int
	var rec func(start int, cur []int)
	rec = func(start int, cur []int) {
		if len(cur) == k {
			out = append(out, append([]int(nil), cur...))
			return
		}
		for i := start; i < n; i++ {
			rec(i+1, append(cur, i))
		}
	}
	rec(0, nil)
	return out
}

func pick(safes []safe.Safe, idx []int) []safe.Safe {
	out := make([]safe.Safe, len(idx))
	for i, j := range idx {
		out[i] = safes[j]
	}
	return out
}

func TestGenesisThreeOfFive(t *testing.T) {
	ctx := context.Background()
	safes := fileSafes(t, 5)
	m, rmk, err := safe.Genesis(ctx, safe.SplitConfig{Threshold: 3, Safes: safes})
	if err != nil {
		t.Fatalf("Genesis = %v", err)
	}
	defer rmk.Wipe()
	if rmk.Len() != safe.RMKSize || !safe.CheckKCV(rmk, m) {
		t.Fatalf("Genesis returned a key that does not match its own KCV")
	}
	if m.GetThreshold() != 3 || len(m.GetSlots()) != 5 || m.GetEpoch() != 0 {
		t.Errorf("manifest threshold %d, slots %d, epoch %d; want 3, 5, 0", m.GetThreshold(), len(m.GetSlots()), m.GetEpoch())
	}
	// Every 3-subset recovers the RMK.
	three := subsets(5, 3)
	if len(three) != 10 {
		t.Fatalf("got %d subsets, want 10", len(three))
	}
	for _, idx := range three {
		got, err := safe.Recover(ctx, m, pick(safes, idx))
		if err != nil {
			t.Errorf("Recover(%v) = %v", idx, err)
			continue
		}
		if !got.Equal(rmk) {
			t.Errorf("Recover(%v) returned another key", idx)
		}
		got.Wipe()
	}
	// Every 2-subset fails, saying how far it got.
	for _, idx := range subsets(5, 2) {
		_, err := safe.Recover(ctx, m, pick(safes, idx))
		if !errors.Is(err, safe.ErrThresholdNotMet) || !strings.Contains(err.Error(), "(2/3)") {
			t.Errorf("Recover(%v) = %v, want threshold not met (2/3)", idx, err)
		}
	}
	// Four and five shares work too.
	for _, idx := range [][]int{{0, 1, 2, 3}, {0, 1, 2, 3, 4}} {
		if got, err := safe.Recover(ctx, m, pick(safes, idx)); err != nil || !got.Equal(rmk) {
			t.Errorf("Recover(%v) = %v", idx, err)
		}
	}
}

func TestCombinerRefusesBadShares(t *testing.T) {
	ctx := context.Background()
	safes := fileSafes(t, 5)
	m, rmk, err := safe.Genesis(ctx, safe.SplitConfig{Threshold: 3, Safes: safes})
	if err != nil {
		t.Fatal(err)
	}
	defer rmk.Wipe()
	otherSafes := fileSafes(t, 3)
	other, otherRMK, err := safe.Genesis(ctx, safe.SplitConfig{Threshold: 3, Safes: otherSafes})
	if err != nil {
		t.Fatal(err)
	}
	otherRMK.Wipe()
	share := func(m *safev1.GenesisManifest, s safe.Safe, i uint32) secret.Bytes {
		t.Helper()
		b, err := s.Unseal(ctx, safe.ShareRef{GenesisID: m.GetGenesisId(), Epoch: m.GetEpoch(), Index: i})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	s1, s2, s3 := share(m, safes[0], 1), share(m, safes[1], 2), share(m, safes[2], 3)
	flipped := s2.Data()
	flipped[0] ^= 1

	c, err := safe.NewCombiner(m)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Add(1, s1); err != nil {
		t.Fatalf("Add(good share 1) = %v", err)
	}
	tests := []struct {
		name  string
		index uint32
		share secret.Bytes
		want  error
	}{
		{"duplicate", 1, s1, safe.ErrDuplicateShare},
		{"corrupted", 2, secret.New(flipped), safe.ErrBadShare},
		{"share 1 presented as 2", 2, s1, safe.ErrBadShare},
		{"share of another genesis", 2, share(other, otherSafes[1], 2), safe.ErrBadShare},
		{"index not in manifest", 6, s2, safe.ErrUnknownShare},
		{"index 0", 0, s2, safe.ErrUnknownShare},
		{"empty", 2, secret.Bytes{}, safe.ErrBadShare},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := c.Add(tt.index, tt.share); !errors.Is(err, tt.want) {
				t.Errorf("Add(%d, %s) = %v, want %v", tt.index, tt.name, err, tt.want)
			}
			// A refused share changes nothing.
			if got := c.Indices(); len(got) != 1 || got[0] != 1 {
				t.Errorf("after a refused share Indices() = %v, want [1]", got)
			}
		})
	}
	if _, err := c.Combine(); !errors.Is(err, safe.ErrThresholdNotMet) || !strings.Contains(err.Error(), "(1/3)") {
		t.Errorf("Combine with 1 of 3 = %v, want threshold not met (1/3)", err)
	}
	for i, s := range map[uint32]secret.Bytes{2: s2, 3: s3} {
		if err := c.Add(i, s); err != nil {
			t.Fatalf("Add(good share %d) = %v", i, err)
		}
	}
	got, err := c.Combine()
	if err != nil || !got.Equal(rmk) {
		t.Fatalf("Combine with 3 good shares = %v", err)
	}
	c.Wipe()
	if len(c.Indices()) != 0 {
		t.Errorf("after Wipe Indices() = %v, want none", c.Indices())
	}
}

// TestCombineDetectsInconsistentManifest: vault/shamir returns a wrong key
// silently; if a manifest's commitments were made for other shares than its
// KCV's key (a forged or mixed-up manifest), the KCV check catches it.
func TestCombineDetectsInconsistentManifest(t *testing.T) {
	ctx := context.Background()
	safes := fileSafes(t, 3)
	m, rmk, err := safe.Genesis(ctx, safe.SplitConfig{Threshold: 2, Safes: safes})
	if err != nil {
		t.Fatal(err)
	}
	rmk.Wipe()
	forged := proto.Clone(m).(*safev1.GenesisManifest)
	forged.Kcv[0] ^= 1
	if _, err := safe.Recover(ctx, forged, safes[:2]); !errors.Is(err, safe.ErrKCVMismatch) {
		t.Errorf("Recover with a manifest whose KCV is wrong = %v, want ErrKCVMismatch", err)
	}
}

// failingSafe fails to seal after n successes, to exercise rollback.
type failingSafe struct {
	safe.Safe
	fail bool
}

func (f *failingSafe) Seal(ctx context.Context, ref safe.ShareRef, s secret.Bytes) error {
	if f.fail {
		return errors.New("token removed")
	}
	return f.Safe.Seal(ctx, ref, s)
}

func TestGenesisRollsBack(t *testing.T) {
	ctx := context.Background()
	safes := fileSafes(t, 4)
	safes[3] = &failingSafe{Safe: safes[3], fail: true}
	_, rmk, err := safe.Genesis(ctx, safe.SplitConfig{Threshold: 2, Safes: safes})
	if err == nil || !strings.Contains(err.Error(), "token removed") {
		t.Fatalf("Genesis with a failing safe = %v, want the safe's error", err)
	}
	if !rmk.IsZero() {
		t.Errorf("a failed Genesis returned a key")
	}
	for _, s := range safes[:3] {
		if refs, err := s.List(ctx); err != nil || len(refs) != 0 {
			t.Errorf("after a failed genesis %s holds %v (%v), want nothing", s.Label(), refs, err)
		}
	}
}

func TestGenesisConfigErrors(t *testing.T) {
	safes := fileSafes(t, 3)
	tests := []struct {
		name string
		cfg  safe.SplitConfig
	}{
		{"threshold 1", safe.SplitConfig{Threshold: 1, Safes: safes}},
		{"threshold above N", safe.SplitConfig{Threshold: 4, Safes: safes}},
		{"same safe twice", safe.SplitConfig{Threshold: 2, Safes: []safe.Safe{safes[0], safes[0], safes[1]}}},
		{"officers count", safe.SplitConfig{Threshold: 2, Safes: safes, Officers: []string{"a"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, _, err := safe.Genesis(context.Background(), tt.cfg); err == nil {
				t.Errorf("Genesis(%s) = nil error, want error", tt.name)
			}
		})
	}
	for _, s := range safes {
		if refs, _ := s.List(context.Background()); len(refs) != 0 {
			t.Errorf("a refused genesis left %v in %s", refs, s.Label())
		}
	}
}

// TestGenesisRefusesBadOfficers: a distributor compares the officer a share
// is bound to with the submitting officer's SPIFFE ID, so an officer that is
// not a full SPIFFE ID (the relative form the allowlists use), one named
// twice, or officers of two trust domains would lock shares out of every
// ceremony. Genesis refuses them naming the entry, and seals nothing.
func TestGenesisRefusesBadOfficers(t *testing.T) {
	safes := fileSafes(t, 3)
	full := func(td string, i int) string { return fmt.Sprintf("spiffe://%s/officer/global/officer-%d", td, i) }
	tests := []struct {
		name     string
		officers []string
		want     string
	}{
		{"relative", []string{"officer/global/officer-1", "officer/global/officer-2", "officer/global/officer-3"},
			`officer "officer/global/officer-1" of share 1 is not a full SPIFFE ID`},
		{"one relative", []string{full("cairn.test", 1), full("cairn.test", 2), "officer/global/officer-3"},
			`officer "officer/global/officer-3" of share 3 is not a full SPIFFE ID`},
		{"two path segments", []string{full("cairn.test", 1), "spiffe://cairn.test/officer/officer-2", full("cairn.test", 3)},
			`officer "spiffe://cairn.test/officer/officer-2" of share 2 is not a full SPIFFE ID`},
		{"empty entry", []string{full("cairn.test", 1), "", full("cairn.test", 3)}, "officer 2 of 3 is empty"},
		{"named twice", []string{full("cairn.test", 1), full("cairn.test", 2), full("cairn.test", 1)},
			"officer " + full("cairn.test", 1) + " is named for shares 1 and 3"},
		{"two trust domains", []string{full("cairn.test", 1), full("other.test", 2), full("cairn.test", 3)},
			"officer " + full("other.test", 2) + " of share 2 is of trust domain other.test"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, rmk, err := safe.Genesis(context.Background(), safe.SplitConfig{Threshold: 2, Safes: safes, Officers: tt.officers})
			if err == nil || !strings.Contains(err.Error(), tt.want) || m != nil || !rmk.IsZero() {
				t.Errorf("Genesis(officers %q) = %v, %v; want an error containing %q and nothing returned", tt.officers, m, err, tt.want)
			}
		})
	}
	for _, s := range safes {
		if refs, _ := s.List(context.Background()); len(refs) != 0 {
			t.Errorf("a refused genesis left %v in %s", refs, s.Label())
		}
	}
}

func TestRekey(t *testing.T) {
	ctx := context.Background()
	old := fileSafes(t, 3)
	m, rmk, err := safe.Genesis(ctx, safe.SplitConfig{Threshold: 2, Safes: old})
	if err != nil {
		t.Fatal(err)
	}
	defer rmk.Wipe()
	recovered, err := safe.Recover(ctx, m, old[:2])
	if err != nil {
		t.Fatal(err)
	}
	defer recovered.Wipe()
	newSafes := fileSafes(t, 5)
	slots := make([]safe.NewSlot, len(newSafes))
	for i, s := range newSafes {
		slots[i] = safe.NewSlot{SafeLabel: s.Label(), SafeKind: s.Kind()}
	}
	m2, shares, err := safe.Resplit(m, recovered, 3, slots, time.Now())
	if err != nil {
		t.Fatalf("Resplit = %v", err)
	}
	for i, s := range newSafes {
		err := s.Seal(ctx, safe.ShareRef{GenesisID: m2.GetGenesisId(), Epoch: m2.GetEpoch(), Index: uint32(i + 1)}, shares[i])
		shares[i].Wipe()
		if err != nil {
			t.Fatal(err)
		}
	}
	prev, _ := safe.ManifestHash(m)
	if m2.GetGenesisId() != m.GetGenesisId() || m2.GetEpoch() != 1 || string(m2.GetKcv()) != string(m.GetKcv()) || string(m2.GetPreviousManifestSha256()) != string(prev) || m2.GetThreshold() != 3 {
		t.Errorf("rekeyed manifest = %v, want same genesis and KCV, epoch 1, threshold 3, linked to the previous", m2)
	}
	got, err := safe.Recover(ctx, m2, newSafes[2:])
	if err != nil || !got.Equal(rmk) {
		t.Fatalf("Recover from the new safes = %v", err)
	}
	// Old shares are untouched until DestroyEpoch.
	if _, err := safe.Recover(ctx, m, old[1:]); err != nil {
		t.Errorf("old shares before DestroyEpoch: %v", err)
	}
	if err := safe.DestroyEpoch(ctx, m, old); err != nil {
		t.Fatalf("DestroyEpoch = %v", err)
	}
	if _, err := safe.Recover(ctx, m, old[:2]); !errors.Is(err, safe.ErrNotFound) {
		t.Errorf("old shares after DestroyEpoch = %v, want ErrNotFound", err)
	}
	// An old-epoch share is refused against the new manifest even if a
	// safe still had one.
	wrongKey := secret.New(make([]byte, 32))
	if _, _, err := safe.Resplit(m2, wrongKey, 2, slots[:2], time.Now()); !errors.Is(err, safe.ErrKCVMismatch) {
		t.Errorf("Resplit with a wrong key = %v, want ErrKCVMismatch", err)
	}
}

func TestManifestFile(t *testing.T) {
	ctx := context.Background()
	m, rmk, err := safe.Genesis(ctx, safe.SplitConfig{Threshold: 2, Safes: fileSafes(t, 2), Officers: []string{"spiffe://cairn.test/officer/global/officer-1", "spiffe://cairn.test/officer/global/officer-2"}})
	if err != nil {
		t.Fatal(err)
	}
	defer rmk.Wipe()
	path := filepath.Join(t.TempDir(), "genesis.json")
	if err := safe.WriteManifest(path, m); err != nil {
		t.Fatal(err)
	}
	got, err := safe.ReadManifest(path)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(got, m) {
		t.Errorf("ReadManifest = %v, want %v", got, m)
	}
}

func TestValidateManifest(t *testing.T) {
	ctx := context.Background()
	good, rmk, err := safe.Genesis(ctx, safe.SplitConfig{Threshold: 2, Safes: fileSafes(t, 3)})
	if err != nil {
		t.Fatal(err)
	}
	rmk.Wipe()
	mut := func(f func(*safev1.GenesisManifest)) *safev1.GenesisManifest {
		m := proto.Clone(good).(*safev1.GenesisManifest)
		f(m)
		return m
	}
	tests := map[string]*safev1.GenesisManifest{
		"nil":              nil,
		"format":           mut(func(m *safev1.GenesisManifest) { m.FormatVersion = 2 }),
		"genesis id":       mut(func(m *safev1.GenesisManifest) { m.GenesisId = "xyz" }),
		"threshold 1":      mut(func(m *safev1.GenesisManifest) { m.Threshold = 1 }),
		"threshold > N":    mut(func(m *safev1.GenesisManifest) { m.Threshold = 4 }),
		"kcv length":       mut(func(m *safev1.GenesisManifest) { m.Kcv = m.Kcv[:16] }),
		"duplicate index":  mut(func(m *safev1.GenesisManifest) { m.Slots[1].Index = 1 }),
		"index 0":          mut(func(m *safev1.GenesisManifest) { m.Slots[0].Index = 0 }),
		"duplicate label":  mut(func(m *safev1.GenesisManifest) { m.Slots[1].SafeLabel = m.Slots[0].SafeLabel }),
		"unknown kind":     mut(func(m *safev1.GenesisManifest) { m.Slots[0].SafeKind = "usb-stick" }),
		"short commitment": mut(func(m *safev1.GenesisManifest) { m.Slots[0].Commitment = []byte{1} }),
	}
	// Officers no ceremony can accept: a manifest that names them is still
	// read (a distributor or root KMS that pinned one must start), but
	// ValidateOfficers, which genesis, a rekey, a provisioning and a drill
	// apply, refuses them.
	badOfficers := map[string]*safev1.GenesisManifest{
		"relative officer": mut(func(m *safev1.GenesisManifest) { m.Slots[0].Officer = "officer/global/officer-1" }),
		"officer twice": mut(func(m *safev1.GenesisManifest) {
			m.Slots[0].Officer, m.Slots[2].Officer = "spiffe://cairn.test/officer/global/a", "spiffe://cairn.test/officer/global/a"
		}),
		"officers of two trust domains": mut(func(m *safev1.GenesisManifest) {
			m.Slots[0].Officer, m.Slots[1].Officer = "spiffe://cairn.test/officer/global/a", "spiffe://other.test/officer/global/b"
		}),
	}
	for name, m := range badOfficers {
		if err := safe.ValidateManifest(m); err != nil {
			t.Errorf("ValidateManifest(%s) = %v, want nil (the manifest is readable)", name, err)
		}
		if err := safe.ValidateOfficers(safe.Officers(m)); err == nil {
			t.Errorf("ValidateOfficers(%s) = nil, want an error", name)
		}
	}
	if err := safe.ValidateManifest(good); err != nil {
		t.Fatalf("ValidateManifest(good) = %v", err)
	}
	// Officers may be named for some shares only; those named are checked.
	named := mut(func(m *safev1.GenesisManifest) { m.Slots[1].Officer = "spiffe://cairn.test/officer/global/b" })
	if err := safe.ValidateOfficers(safe.Officers(named)); err != nil {
		t.Errorf("ValidateOfficers(one officer named) = %v", err)
	}
	for name, m := range tests {
		if err := safe.ValidateManifest(m); !errors.Is(err, safe.ErrInvalidManifest) {
			t.Errorf("ValidateManifest(%s) = %v, want ErrInvalidManifest", name, err)
		}
	}
}

func FuzzParseManifest(f *testing.F) {
	f.Add([]byte(`{"formatVersion":1}`))
	f.Add([]byte{0x08, 0x01})
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := safe.ParseManifest(data)
		if err == nil {
			if verr := safe.ValidateManifest(m); verr != nil {
				t.Fatalf("ParseManifest accepted a manifest that does not validate: %v", verr)
			}
		}
	})
}

func TestValidateSplit(t *testing.T) {
	tests := []struct {
		threshold, n int
		ok           bool
	}{
		{2, 2, true}, {3, 5, true}, {2, safe.MaxShares, true},
		{1, 3, false}, {0, 0, false}, {4, 3, false}, {2, safe.MaxShares + 1, false},
	}
	for _, tt := range tests {
		if err := safe.ValidateSplit(tt.threshold, tt.n); (err == nil) != tt.ok {
			t.Errorf("ValidateSplit(%d, %d) = %v, want ok %v", tt.threshold, tt.n, err, tt.ok)
		}
	}
}

func TestCheckSuccessor(t *testing.T) {
	ctx := context.Background()
	m, rmk, err := safe.Genesis(ctx, safe.SplitConfig{Threshold: 2, Safes: fileSafes(t, 2)})
	if err != nil {
		t.Fatal(err)
	}
	defer rmk.Wipe()
	next, shares, err := safe.Resplit(m, rmk, 2, []safe.NewSlot{{SafeLabel: "a", SafeKind: safe.KindInsecureFile}, {SafeLabel: "b", SafeKind: safe.KindInsecureFile}}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range shares {
		s.Wipe()
	}
	if err := safe.CheckSuccessor(m, next); err != nil {
		t.Fatalf("CheckSuccessor(genesis, its resplit) = %v, want nil", err)
	}
	tests := []struct {
		name   string
		mutate func(m *safev1.GenesisManifest)
	}{
		{"other genesis", func(m *safev1.GenesisManifest) { m.GenesisId = "00112233445566778899aabbccddeeff" }},
		{"other kcv", func(m *safev1.GenesisManifest) { m.Kcv = append([]byte{m.Kcv[0] ^ 1}, m.Kcv[1:]...) }},
		{"same epoch", func(m *safev1.GenesisManifest) { m.Epoch-- }},
		{"skipped epoch", func(m *safev1.GenesisManifest) { m.Epoch++ }},
		{"broken link", func(m *safev1.GenesisManifest) {
			m.PreviousManifestSha256 = append([]byte{m.PreviousManifestSha256[0] ^ 1}, m.PreviousManifestSha256[1:]...)
		}},
	}
	for _, tt := range tests {
		bad := proto.Clone(next).(*safev1.GenesisManifest)
		tt.mutate(bad)
		if err := safe.CheckSuccessor(m, bad); err == nil {
			t.Errorf("CheckSuccessor(genesis, %s) = nil, want error", tt.name)
		}
	}
	if err := safe.CheckSuccessor(next, m); err == nil {
		t.Errorf("CheckSuccessor(epoch 1, epoch 0) = nil, want error")
	}
}

func TestRekeyShareInfo(t *testing.T) {
	got, err := safe.RekeyShareInfo("c1", "g1", 2, 7)
	if want := "cairn/distributor/v1/rekey-share\x00c1\x00g1\x002\x007"; err != nil || string(got) != want {
		t.Errorf("RekeyShareInfo(c1, g1, 2, 7) = %q, %v, want %q", got, err, want)
	}
	if _, err := safe.RekeyShareInfo("c\x001", "g1", 2, 7); err == nil {
		t.Errorf("RekeyShareInfo with a NUL in the ceremony id = nil error, want error")
	}
}
