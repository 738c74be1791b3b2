package safe

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/vault/shamir"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/secret"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
)

// SplitConfig says how to split the RMK into safes.
type SplitConfig struct {
	// Threshold is K: how many shares reconstruct the RMK (2 <= K <= N).
	Threshold int
	// Safes are the N safes; share i goes into Safes[i-1]. Each must have a
	// distinct label.
	Safes []Safe
	// Officers optionally names, per safe, the full SPIFFE ID of the officer
	// who holds it (empty, or one distinct entry per safe; see
	// ValidateOfficers).
	Officers []string
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// ValidateSplit checks the shape of a threshold-of-n split:
// 2 <= threshold <= n <= MaxShares.
func ValidateSplit(threshold, n int) error {
	switch {
	case threshold < 2:
		return fmt.Errorf("safe: threshold %d, want at least 2 (a single share would be the key itself)", threshold)
	case n < threshold:
		return fmt.Errorf("safe: %d safes for threshold %d; need at least as many safes as the threshold", n, threshold)
	case n > MaxShares:
		return fmt.Errorf("safe: %d safes, at most %d", n, MaxShares)
	}
	return nil
}

func (c SplitConfig) validate() error {
	n := len(c.Safes)
	if err := ValidateSplit(c.Threshold, n); err != nil {
		return err
	}
	if len(c.Officers) != 0 && len(c.Officers) != n {
		return fmt.Errorf("safe: %d officers for %d safes; name one per safe or none", len(c.Officers), n)
	}
	for i, o := range c.Officers {
		if o == "" {
			return fmt.Errorf("safe: officer %d of %d is empty; name one per safe or none", i+1, n)
		}
	}
	// Checked before anything is sealed: the manifest would pin them, and
	// an officer that matches no one locks every ceremony out.
	if err := ValidateOfficers(c.Officers); err != nil {
		return fmt.Errorf("safe: %w", err)
	}
	labels := map[string]bool{}
	for _, s := range c.Safes {
		if labels[s.Label()] {
			return fmt.Errorf("safe: safe %q given twice; each share needs its own safe", s.Label())
		}
		labels[s.Label()] = true
	}
	return nil
}

// Genesis creates a new RMK from crypto/rand and splits it K-of-N into the
// safes. It seals share i into safe i, builds the manifest, then verifies
// that every share unseals to its commitment and that overlapping groups of
// K shares covering every share reproduce the KCV. If anything fails, the
// shares it sealed are destroyed again and nothing is returned.
//
// The caller hands the returned RMK to the distributors and then wipes it.
func Genesis(ctx context.Context, cfg SplitConfig) (*safev1.GenesisManifest, secret.Bytes, error) {
	if err := cfg.validate(); err != nil {
		return nil, secret.Bytes{}, err
	}
	var id [16]byte
	_, _ = rand.Read(id[:])
	rmk, err := secret.Random(RMKSize)
	if err != nil {
		return nil, secret.Bytes{}, err
	}
	m := &safev1.GenesisManifest{
		FormatVersion: 1,
		GenesisId:     hex.EncodeToString(id[:]),
		Kcv:           nil,
	}
	m.Kcv = KCV(rmk, m.GetGenesisId())
	if err := split(ctx, cfg, rmk, m); err != nil {
		rmk.Wipe()
		return nil, secret.Bytes{}, err
	}
	return m, rmk, nil
}

// split fills m's threshold, slots and time, seals the shares and verifies
// them; on failure it destroys what it sealed.
func split(ctx context.Context, cfg SplitConfig, rmk secret.Bytes, m *safev1.GenesisManifest) (err error) {
	now := time.Now
	if cfg.Now != nil {
		now = cfg.Now
	}
	key := rmk.Data()
	parts, err := shamir.Split(key, len(cfg.Safes), cfg.Threshold)
	clear(key)
	if err != nil {
		return fmt.Errorf("safe: splitting the key: %w", err)
	}
	defer func() {
		for _, p := range parts {
			clear(p)
		}
	}()
	m.Threshold = uint32(cfg.Threshold)
	m.CreatedAt = timestamppb.New(now())
	m.Slots = nil

	var sealed []int // indices into cfg.Safes that hold a share now
	defer func() {
		if err == nil {
			return
		}
		// Roll back: a genesis either completes or leaves nothing.
		cleanup := context.WithoutCancel(ctx)
		for _, i := range sealed {
			ref := ShareRef{GenesisID: m.GetGenesisId(), Epoch: m.GetEpoch(), Index: uint32(i + 1)}
			if derr := cfg.Safes[i].Destroy(cleanup, ref); derr != nil {
				err = errors.Join(err, fmt.Errorf("safe: rolling back share %d in %s: %w", i+1, cfg.Safes[i].Label(), derr))
			}
		}
	}()
	for i, s := range cfg.Safes {
		ref := ShareRef{GenesisID: m.GetGenesisId(), Epoch: m.GetEpoch(), Index: uint32(i + 1)}
		slot := &safev1.ShareSlot{
			Index:      ref.Index,
			SafeLabel:  s.Label(),
			SafeKind:   s.Kind(),
			Commitment: Commitment(ref, parts[i]),
		}
		if len(cfg.Officers) > 0 {
			slot.Officer = cfg.Officers[i]
		}
		m.Slots = append(m.Slots, slot)
		share := secret.New(parts[i])
		err := s.Seal(ctx, ref, share)
		share.Wipe()
		if err != nil {
			return fmt.Errorf("safe: sealing share %d into %s: %w", ref.Index, s.Label(), err)
		}
		sealed = append(sealed, i)
	}
	if err := ValidateManifest(m); err != nil {
		return err
	}
	return verify(ctx, m, cfg.Safes)
}

// verify unseals every share and checks the set with VerifyShares: each
// share against its commitment, and overlapping windows of K shares that
// together cover every share against the KCV.
func verify(ctx context.Context, m *safev1.GenesisManifest, safes []Safe) error {
	shares := make([]secret.Bytes, len(safes))
	defer func() {
		for _, s := range shares {
			s.Wipe()
		}
	}()
	for i, s := range safes {
		ref := ShareRef{GenesisID: m.GetGenesisId(), Epoch: m.GetEpoch(), Index: uint32(i + 1)}
		share, err := s.Unseal(ctx, ref)
		if err != nil {
			return fmt.Errorf("safe: verifying share %d in %s: %w", ref.Index, s.Label(), err)
		}
		shares[i] = share
	}
	return VerifyShares(m, shares)
}

// SafeError is why one safe gave no usable share to Recover: it names the
// safe and, when the manifest assigns it one, the share index.
type SafeError struct {
	Label string
	Index uint32 // 0 if the safe holds no share of the manifest
	Err   error
}

func (e *SafeError) Error() string {
	if e.Index == 0 {
		return fmt.Sprintf("safe: %s: %v", e.Label, e.Err)
	}
	return fmt.Sprintf("safe: share %d from %s: %v", e.Index, e.Label, e.Err)
}

func (e *SafeError) Unwrap() error { return e.Err }

// JoinFailures joins the errors of the safes that failed (nil if none), so
// that errors.Is and errors.As reach each of them.
func JoinFailures(failed []*SafeError) error {
	errs := make([]error, len(failed))
	for i, f := range failed {
		errs[i] = f
	}
	return errors.Join(errs...)
}

// Recovery says how RecoverReport went: which shares it combined and which
// safes it had to skip.
type Recovery struct {
	// Used are the indices of the shares the key was combined from.
	Used []uint32
	// Accepted are the indices of every share that passed its commitment
	// check (Used and any beyond the threshold), ascending.
	Accepted []uint32
	// Failed has one entry per safe that gave no usable share, in the
	// order the safes were given.
	Failed []*SafeError
}

// Recover reconstructs the RMK from the shares of m held by the given safes,
// checking each share's commitment and the combined key's KCV. Each safe's
// share is found by its label in the manifest. It is RecoverReport without
// the report: a safe that fails is skipped as long as K others succeed, and
// its error is then dropped. Callers that must tell an operator which safes
// are broken (drills, recovery tools) use RecoverReport.
func Recover(ctx context.Context, m *safev1.GenesisManifest, safes []Safe) (secret.Bytes, error) {
	rmk, _, err := RecoverReport(ctx, m, safes)
	return rmk, err
}

// RecoverReport is Recover, also reporting which safes failed. It asks every
// safe given for its share. A safe that cannot give one (it cannot unseal,
// its share does not match the manifest commitment, it holds no share of m,
// or it repeats another safe's slot) is skipped and its error kept in
// Recovery.Failed, naming the safe and the share index: one dead HSM must
// not block a recovery that a quorum of the others can complete. If fewer
// than K shares pass, the error wraps ErrThresholdNotMet and every safe's
// error. Only an ended ctx stops it early (its error is returned, with the
// failures so far), and a combined key that does not match the KCV
// (ErrKCVMismatch: the manifest itself is inconsistent) fails it. The
// caller owns (and must wipe) the returned key.
func RecoverReport(ctx context.Context, m *safev1.GenesisManifest, safes []Safe) (secret.Bytes, Recovery, error) {
	var rep Recovery
	c, err := NewCombiner(m)
	if err != nil {
		return secret.Bytes{}, rep, err
	}
	defer c.Wipe()
	for _, s := range safes {
		if err := ctx.Err(); err != nil {
			return secret.Bytes{}, rep, errors.Join(fmt.Errorf("safe: recovery stopped: %w", err), JoinFailures(rep.Failed))
		}
		index, err := SlotOf(m, s)
		if err != nil {
			rep.Failed = append(rep.Failed, &SafeError{Label: s.Label(), Err: err})
			continue
		}
		share, err := s.Unseal(ctx, ShareRef{GenesisID: m.GetGenesisId(), Epoch: m.GetEpoch(), Index: index})
		if err != nil {
			if ctx.Err() != nil && errors.Is(err, ctx.Err()) {
				// Not the safe's fault: the caller gave up.
				return secret.Bytes{}, rep, errors.Join(fmt.Errorf("safe: recovery stopped at share %d from %s: %w", index, s.Label(), err), JoinFailures(rep.Failed))
			}
			rep.Failed = append(rep.Failed, &SafeError{Label: s.Label(), Index: index, Err: err})
			continue
		}
		err = c.Add(index, share)
		share.Wipe()
		if err != nil {
			rep.Failed = append(rep.Failed, &SafeError{Label: s.Label(), Index: index, Err: err})
		}
	}
	rep.Accepted = c.Indices()
	rmk, err := c.Combine()
	if err != nil {
		return secret.Bytes{}, rep, errors.Join(err, JoinFailures(rep.Failed))
	}
	rep.Used = rep.Accepted[:c.Threshold()]
	return rmk, rep, nil
}

// SlotOf returns the share index the manifest assigns to a safe (by label).
func SlotOf(m *safev1.GenesisManifest, s Safe) (uint32, error) {
	for _, slot := range m.GetSlots() {
		if slot.GetSafeLabel() == s.Label() {
			if slot.GetSafeKind() != s.Kind() {
				return 0, fmt.Errorf("safe: manifest lists %s as a %s safe, but it is %s", s.Label(), slot.GetSafeKind(), s.Kind())
			}
			return slot.GetIndex(), nil
		}
	}
	return 0, fmt.Errorf("safe: safe %s holds no share of genesis %s epoch %d", s.Label(), m.GetGenesisId(), m.GetEpoch())
}

// DestroyEpoch removes from each safe its share of manifest m (used after a
// rekey, once the new manifest is written). It tries every safe and reports
// all failures.
func DestroyEpoch(ctx context.Context, m *safev1.GenesisManifest, safes []Safe) error {
	var errs []error
	for _, s := range safes {
		index, err := SlotOf(m, s)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		ref := ShareRef{GenesisID: m.GetGenesisId(), Epoch: m.GetEpoch(), Index: index}
		if err := s.Destroy(ctx, ref); err != nil {
			errs = append(errs, fmt.Errorf("safe: destroying share %s in %s: %w", ref, s.Label(), err))
		}
	}
	return errors.Join(errs...)
}

// NewSlot describes one safe of a resplit (see Resplit): where share i goes.
type NewSlot struct {
	SafeLabel, SafeKind, Officer string
}

// Resplit splits rmk anew in memory for a rekey ceremony: the next epoch of
// prev (same genesis id and KCV, linked to prev), K-of-len(slots), with a
// commitment per share. It checks rmk against prev's KCV first, and before
// returning verifies that every share matches its commitment and that
// overlapping windows of K shares covering every share reproduce the KCV.
// Share i (1-based) is shares[i-1]; the caller seals each to its safe and
// wipes it. Nothing is returned on error.
func Resplit(prev *safev1.GenesisManifest, rmk secret.Bytes, threshold int, slots []NewSlot, now time.Time) (*safev1.GenesisManifest, []secret.Bytes, error) {
	if err := ValidateManifest(prev); err != nil {
		return nil, nil, err
	}
	if !CheckKCV(rmk, prev) {
		return nil, nil, fmt.Errorf("%w: the key given for rekey is not the manifest's RMK", ErrKCVMismatch)
	}
	n := len(slots)
	if err := ValidateSplit(threshold, n); err != nil {
		return nil, nil, err
	}
	prevHash, err := ManifestHash(prev)
	if err != nil {
		return nil, nil, err
	}
	m := &safev1.GenesisManifest{
		FormatVersion: 1, GenesisId: prev.GetGenesisId(), Epoch: prev.GetEpoch() + 1, Kcv: prev.GetKcv(),
		PreviousManifestSha256: prevHash, Threshold: uint32(threshold), CreatedAt: timestamppb.New(now),
	}
	key := rmk.Data()
	parts, err := shamir.Split(key, n, threshold)
	clear(key)
	if err != nil {
		return nil, nil, fmt.Errorf("safe: splitting the key: %w", err)
	}
	shares := make([]secret.Bytes, n)
	for i, p := range parts {
		ref := ShareRef{GenesisID: m.GetGenesisId(), Epoch: m.GetEpoch(), Index: uint32(i + 1)}
		m.Slots = append(m.Slots, &safev1.ShareSlot{Index: ref.Index, SafeLabel: slots[i].SafeLabel, SafeKind: slots[i].SafeKind,
			Officer: slots[i].Officer, Commitment: Commitment(ref, p)})
		shares[i] = secret.New(p)
		clear(p)
	}
	wipe := func() {
		for _, s := range shares {
			s.Wipe()
		}
	}
	err = ValidateManifest(m)
	if err == nil {
		err = ValidateOfficers(Officers(m))
	}
	if err != nil {
		wipe()
		return nil, nil, err
	}
	if err := VerifyShares(m, shares); err != nil {
		wipe()
		return nil, nil, err
	}
	return m, shares, nil
}

// VerifyShares checks every share of m (shares[i] is share i+1) against its
// commitment, and combines overlapping windows of K shares that together
// cover every share, checking each result against the KCV.
func VerifyShares(m *safev1.GenesisManifest, shares []secret.Bytes) error {
	n, k := len(shares), int(m.GetThreshold())
	if n != len(m.GetSlots()) {
		return fmt.Errorf("%w: %d shares for a manifest of %d", ErrInvalidManifest, n, len(m.GetSlots()))
	}
	for i, s := range shares {
		if err := checkCommitment(m, uint32(i+1), s); err != nil {
			return fmt.Errorf("safe: verifying share %d: %w", i+1, err)
		}
	}
	for start := 0; start < n; start += k {
		c, err := NewCombiner(m)
		if err != nil {
			return err
		}
		for j := range k {
			i := (start + j) % n
			if err := c.Add(uint32(i+1), shares[i]); err != nil {
				c.Wipe()
				return fmt.Errorf("safe: verifying shares: %w", err)
			}
		}
		indices := c.Indices()
		rmk, err := c.Combine()
		c.Wipe()
		if err != nil {
			return fmt.Errorf("safe: verifying that shares %v reproduce the key: %w", indices, err)
		}
		rmk.Wipe()
	}
	return nil
}
