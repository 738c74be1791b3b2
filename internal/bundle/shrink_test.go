package bundle_test

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/bundle"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
)

// shrinkKeyset is a keyset as CheckShrink reads it: a name, an ACL of one
// pattern per operation, and versions with key IDs 1..versions.
func shrinkKeyset(name string, versions int) *bundlev1.KeysetConfig {
	p := []string{"client/us-east/" + strings.ReplaceAll(name, "/", "-")}
	ek := &cryptov1.EncryptedKeyset{Name: name, Region: region}
	for id := range versions {
		ek.Versions = append(ek.Versions, &cryptov1.KeyVersionInfo{KeyId: uint32(id + 1)})
	}
	return &bundlev1.KeysetConfig{Name: name, Keyset: ek,
		Acl: &bundlev1.Acl{Encrypt: slices.Clone(p), Decrypt: slices.Clone(p), GenerateDataKey: slices.Clone(p), Rewrap: slices.Clone(p)}}
}

// shrinkBundle is a bundle of n keysets k00..k(n-1), each of versions
// versions, sorted by name.
func shrinkBundle(serial uint64, n, versions int) *bundlev1.Bundle {
	b := &bundlev1.Bundle{Region: region, Serial: serial}
	for i := range n {
		b.Keysets = append(b.Keysets, shrinkKeyset(fmt.Sprintf("team/k%02d", i), versions))
	}
	return b
}

// keep returns b's keysets whose index keep accepts.
func keep(b *bundlev1.Bundle, keep func(i int) bool) *bundlev1.Bundle {
	out := proto.CloneOf(b)
	out.Serial++
	out.Keysets = nil
	for i, k := range b.GetKeysets() {
		if keep(i) {
			out.Keysets = append(out.Keysets, proto.CloneOf(k))
		}
	}
	return out
}

// change returns a copy of b at the next serial with f applied to each
// keyset.
func change(b *bundlev1.Bundle, f func(i int, k *bundlev1.KeysetConfig)) *bundlev1.Bundle {
	out := proto.CloneOf(b)
	out.Serial++
	for i, k := range out.Keysets {
		f(i, k)
	}
	return out
}

// dropVersions removes the versions of k whose key IDs are listed.
func dropVersions(k *bundlev1.KeysetConfig, ids ...uint32) {
	k.Keyset.Versions = slices.DeleteFunc(k.Keyset.Versions, func(v *cryptov1.KeyVersionInfo) bool { return slices.Contains(ids, v.GetKeyId()) })
}

func withOverride(b *bundlev1.Bundle, reason string) *bundlev1.Bundle {
	b.ShrinkOverride = &bundlev1.ShrinkOverride{Reason: reason, ForcedBy: createdBy}
	return b
}

// TestCheckShrink is the shrink guard's table of thresholds, with the 2014
// cases: a merged config truncated to a third, an empty bundle, and a
// region mistyped in the team files (the region's bundle holds none of its
// keysets).
func TestCheckShrink(t *testing.T) {
	three := shrinkBundle(1, 3, 1)
	thirty := shrinkBundle(1, 30, 1)
	ten3 := shrinkBundle(1, 10, 3)
	const small = 10 << 10 // sizes the size check leaves alone
	tests := []struct {
		name           string
		cur, next      *bundlev1.Bundle
		curSize, size  int
		guard          bundle.ShrinkGuard
		wantErr        []string // substrings of the refusal; nil: accepted
		wantOverride   bool
		wantSummary    string // a substring of String()
		wantKeysetDrop int
	}{
		{name: "nothing served", cur: nil, next: shrinkBundle(1, 0, 0), size: 50, wantSummary: "nothing served"},
		{name: "the same content", cur: three, next: keep(three, func(int) bool { return true }), curSize: small, size: small, wantSummary: "within the guard"},
		{name: "a bundle that grows", cur: three, next: shrinkBundle(2, 30, 2), curSize: small, size: 10 * small},

		// Keysets: 10% or 1, whichever is more, never all.
		{name: "drops 1 of 3 keysets (the floor)", cur: three, next: keep(three, func(i int) bool { return i != 1 }), curSize: small, size: small, wantKeysetDrop: 1},
		{name: "drops 2 of 3 keysets", cur: three, next: keep(three, func(i int) bool { return i == 0 }), curSize: small, size: small,
			wantErr: []string{"bundle: shrink guard: against the served serial 1, the bundle drops 2 of 3 keysets (67%, more than 10% and more than 1): team/k01, team/k02"}, wantKeysetDrop: 2},
		{name: "drops 3 of 30 keysets (10%)", cur: thirty, next: keep(thirty, func(i int) bool { return i >= 3 }), curSize: small, size: small, wantKeysetDrop: 3},
		{name: "drops 4 of 30 keysets", cur: thirty, next: keep(thirty, func(i int) bool { return i >= 4 }), curSize: small, size: small,
			wantErr: []string{"drops 4 of 30 keysets (13%, more than 10% and more than 1): team/k00, team/k01, team/k02, team/k03"}},
		{name: "drops the only keyset", cur: shrinkBundle(1, 1, 1), next: shrinkBundle(2, 0, 0), curSize: 200, size: 20,
			wantErr: []string{"drops 1 of 1 keysets (100%: never all of them): team/k00"}},
		{name: "a guard of 50%", cur: shrinkBundle(1, 4, 1), next: keep(shrinkBundle(1, 4, 1), func(i int) bool { return i < 2 }), curSize: small, size: small,
			guard: bundle.ShrinkGuard{MaxKeysetDrop: 0.5}},

		// 2014.
		{name: "2014: the merged config truncated to a third", cur: thirty, next: keep(thirty, func(i int) bool { return i < 10 }),
			curSize: 3 << 20, size: 1 << 20, wantErr: []string{
				"drops 20 of 30 keysets (67%, more than 10% and more than 1): team/k10, team/k11, team/k12, team/k13, team/k14, team/k15, team/k16, team/k17, team/k18, team/k19 and 10 more",
				"; and is 1048576 bytes, 33% of the 3145728 served (less than 50%, and more than 65536 bytes smaller)"}},
		{name: "2014: an empty bundle", cur: thirty, next: shrinkBundle(2, 0, 0), curSize: 3 << 20, size: 40,
			wantErr: []string{"drops 30 of 30 keysets (100%, more than 10% and more than 1)", "is 40 bytes, 0% of the 3145728 served"}},
		{name: "2014: a region mistyped in the team files", cur: three, next: &bundlev1.Bundle{Region: region, Serial: 2}, curSize: 900, size: 30,
			wantErr: []string{"drops 3 of 3 keysets (100%, more than 10% and more than 1): team/k00, team/k01, team/k02"}},

		// ACL entries of kept keysets: 10% or 4, whichever is more.
		{name: "one identity revoked from every operation of a keyset", cur: three, curSize: small, size: small,
			next: change(three, func(i int, k *bundlev1.KeysetConfig) {
				if i == 0 {
					k.Acl = &bundlev1.Acl{}
				}
			})},
		{name: "five ACL entries dropped", cur: three, curSize: small, size: small,
			next: change(three, func(i int, k *bundlev1.KeysetConfig) {
				switch i {
				case 0:
					k.Acl = &bundlev1.Acl{}
				case 1:
					k.Acl.Rewrap = nil
				}
			}),
			wantErr: []string{"drops 5 of 12 ACL entries of the keysets it keeps (42%, more than 10% and more than 4): team/k00 decrypt client/us-east/team-k00, team/k00 encrypt"}},
		{name: "every ACL entry dropped", cur: shrinkBundle(1, 1, 1), curSize: small, size: small,
			next:    change(shrinkBundle(1, 1, 1), func(_ int, k *bundlev1.KeysetConfig) { k.Acl = nil }),
			wantErr: []string{"drops 4 of 4 ACL entries of the keysets it keeps (100%: never all of them)"}},
		{name: "an ACL pattern replaced", cur: three, curSize: small, size: small,
			next: change(three, func(_ int, k *bundlev1.KeysetConfig) { k.Acl.Decrypt = []string{"client/*/*"} })},

		// Versions of kept keysets: 10% or one per kept keyset.
		{name: "one version retired in every keyset", cur: ten3, curSize: small, size: small,
			next: change(ten3, func(_ int, k *bundlev1.KeysetConfig) { dropVersions(k, 1) })},
		{name: "two versions dropped in six keysets", cur: ten3, curSize: small, size: small,
			next: change(ten3, func(i int, k *bundlev1.KeysetConfig) {
				if i < 6 {
					dropVersions(k, 1, 2)
				}
			}),
			wantErr: []string{"drops 12 of 30 key versions of the keysets it keeps (40%, more than 10% and more than 10 per kept keyset): team/k00 key 1, team/k00 key 2"}},
		{name: "a dropped keyset's versions count as the keyset", cur: ten3, curSize: small, size: small,
			next: keep(ten3, func(i int) bool { return i != 0 })},

		// Versions destroyed through the lifecycle: a region that missed
		// retirements catches up in one bundle; a truncation does not hide
		// behind them.
		{name: "a lagging region takes two retirements of every keyset at once", cur: ten3, curSize: small, size: small,
			next: change(ten3, func(_ int, k *bundlev1.KeysetConfig) {
				dropVersions(k, 1, 2)
				k.DestroyedKeyIds = []uint32{1, 2}
			}),
			wantSummary: "drops 0 of 10 keysets, 0 of 40 ACL entries and 0 of 10 key versions of the keysets it keeps (besides 20 version(s) destroyed through the lifecycle)"},
		{name: "destroyed versions named, others dropped besides", cur: ten3, curSize: small, size: small,
			next: change(ten3, func(i int, k *bundlev1.KeysetConfig) {
				dropVersions(k, 1)
				k.DestroyedKeyIds = []uint32{1}
				if i < 6 {
					dropVersions(k, 2, 3) // not destroyed: a truncation
				}
			}),
			wantErr: []string{"drops 12 of 20 key versions of the keysets it keeps (60%, more than 10% and more than 10 per kept keyset): team/k00 key 2, team/k00 key 3"}},
		{name: "a destroyed version named for another keyset hides nothing", cur: ten3, curSize: small, size: small,
			next: change(ten3, func(i int, k *bundlev1.KeysetConfig) {
				if i < 6 {
					dropVersions(k, 1, 2)
				} else {
					k.DestroyedKeyIds = []uint32{1, 2}
				}
			}),
			wantErr: []string{"drops 12 of 30 key versions"}},

		// Size: below half and more than 64 KiB smaller.
		{name: "much smaller, same counts", cur: three, next: keep(three, func(int) bool { return true }), curSize: 1_000_000, size: 400_000,
			wantErr: []string{"is 400000 bytes, 40% of the 1000000 served (less than 50%, and more than 65536 bytes smaller)"}},
		{name: "half the size, but only 60 KB smaller", cur: three, next: keep(three, func(int) bool { return true }), curSize: 100_000, size: 40_000},
		{name: "a size ratio of 20%", cur: three, next: keep(three, func(int) bool { return true }), curSize: 1_000_000, size: 400_000,
			guard: bundle.ShrinkGuard{MinSizeRatio: 0.2}},

		// The override.
		{name: "truncated, with an override", cur: thirty, next: withOverride(keep(thirty, func(i int) bool { return i < 10 }), "INC-2014: splitting the region"),
			curSize: 3 << 20, size: 1 << 20, wantOverride: true, wantSummary: "allowed by override: INC-2014: splitting the region (forced by " + createdBy + ")"},
		{name: "an override not needed", cur: three, next: withOverride(keep(three, func(int) bool { return true }), "just in case"),
			curSize: small, size: small, wantOverride: true, wantSummary: "the override is not needed here: just in case"},
		{name: "an override without a reason overrides nothing", cur: three, next: withOverride(keep(three, func(i int) bool { return i == 0 }), "  "),
			curSize: small, size: small, wantErr: []string{"drops 2 of 3 keysets"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := bundle.CheckShrink(tt.cur, tt.next, tt.curSize, tt.size, tt.guard)
			if tt.wantErr == nil {
				if err != nil {
					t.Fatalf("CheckShrink() = %v, want nil", err)
				}
			} else {
				if !errors.Is(err, bundle.ErrShrink) {
					t.Fatalf("CheckShrink() = %v, want ErrShrink", err)
				}
				for _, w := range tt.wantErr {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("CheckShrink() = %q, want it to contain %q", err, w)
					}
				}
				if !r.Exceeded() || !strings.Contains(r.String(), "REFUSED: ") {
					t.Errorf("report of a refusal: Exceeded() = %t, String() = %q; want true and REFUSED", r.Exceeded(), r.String())
				}
			}
			if got := r.Override != nil; got != tt.wantOverride {
				t.Errorf("report override = %v, want set %t", r.Override, tt.wantOverride)
			}
			if !strings.Contains(r.String(), tt.wantSummary) {
				t.Errorf("String() = %q, want it to contain %q", r, tt.wantSummary)
			}
			if tt.wantKeysetDrop != 0 && r.Keysets.Dropped != tt.wantKeysetDrop {
				t.Errorf("Keysets.Dropped = %d, want %d", r.Keysets.Dropped, tt.wantKeysetDrop)
			}
		})
	}
}

func TestShrinkGuardValidate(t *testing.T) {
	for _, g := range []bundle.ShrinkGuard{{MaxKeysetDrop: 1.5}, {MaxACLDrop: -0.1}, {MinSizeRatio: 2}, {MinKeysetDrop: -1}, {MinSizeDrop: -5}} {
		if _, err := bundle.CheckShrink(nil, &bundlev1.Bundle{}, 0, 0, g); err == nil || errors.Is(err, bundle.ErrShrink) {
			t.Errorf("CheckShrink(guard %+v) = %v, want a guard error", g, err)
		}
	}
	if err := (bundle.ShrinkGuard{}).Validate(); err != nil {
		t.Errorf("ShrinkGuard{}.Validate() = %v, want nil (the defaults)", err)
	}
}

// TestValidateOverrides: a shrink override and a partial-build record are
// signed content and must each be complete.
func TestValidateOverrides(t *testing.T) {
	tests := []struct {
		name string
		edit func(b *bundlev1.Bundle)
		want string // "" : valid
	}{
		{"an override", func(b *bundlev1.Bundle) { withOverride(b, "INC-7") }, ""},
		{"an override without a reason", func(b *bundlev1.Bundle) { withOverride(b, " ") }, "shrink_override: no reason"},
		{"an override with a control character", func(b *bundlev1.Bundle) { withOverride(b, "a\nb") }, "shrink_override: reason is not printable"},
		{"an override with a long reason", func(b *bundlev1.Bundle) { withOverride(b, strings.Repeat("x", bundle.MaxReasonLen+1)) }, "reason is 1025 bytes"},
		{"an override by nobody", func(b *bundlev1.Bundle) { b.ShrinkOverride = &bundlev1.ShrinkOverride{Reason: "x"} }, "shrink_override: forced_by"},
		{"a partial build", func(b *bundlev1.Bundle) {
			b.Partial = &bundlev1.PartialBuild{Reason: "INC-8", BuiltBy: createdBy, LeftOut: []string{"search/index: not in the record"}}
		}, ""},
		{"a partial build that left nothing out", func(b *bundlev1.Bundle) {
			b.Partial = &bundlev1.PartialBuild{Reason: "INC-8", BuiltBy: createdBy}
		}, "partial: left_out names nothing"},
		{"a partial build that left out a keyset it holds", func(b *bundlev1.Bundle) {
			b.Partial = &bundlev1.PartialBuild{Reason: "INC-8", BuiltBy: createdBy, LeftOut: []string{"payments/ledger: why"}}
		}, `partial: left_out[0] names keyset "payments/ledger", which the bundle holds`},
		{"a partial build without a reason", func(b *bundlev1.Bundle) {
			b.Partial = &bundlev1.PartialBuild{BuiltBy: createdBy, LeftOut: []string{"a/b: x"}}
		}, "partial: no reason"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := validBundle(t)
			tt.edit(b)
			err := bundle.Validate(b)
			switch {
			case tt.want == "" && err != nil:
				t.Errorf("Validate() = %v, want nil", err)
			case tt.want != "" && (!errors.Is(err, bundle.ErrInvalid) || !strings.Contains(err.Error(), tt.want)):
				t.Errorf("Validate() = %v, want ErrInvalid containing %q", err, tt.want)
			}
		})
	}
}
