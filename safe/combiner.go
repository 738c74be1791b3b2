package safe

import (
	"crypto/hmac"
	"errors"
	"fmt"
	"slices"

	"github.com/hashicorp/vault/shamir"

	"github.com/cairnkms/cairn/internal/secret"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
)

// Errors of share combination.
var (
	// ErrThresholdNotMet: fewer distinct valid shares than the threshold.
	ErrThresholdNotMet = errors.New("safe: threshold not met")
	// ErrUnknownShare: the index is not in the manifest.
	ErrUnknownShare = errors.New("safe: share index not in the manifest")
	// ErrDuplicateShare: a share with this index was already accepted.
	ErrDuplicateShare = errors.New("safe: duplicate share")
	// ErrBadShare: the share does not match its commitment in the manifest
	// (corrupted, of another genesis or epoch, or sealed for another slot).
	ErrBadShare = errors.New("safe: share does not match the manifest commitment")
	// ErrKCVMismatch: shares combined to a key whose KCV is not the
	// manifest's. With every share checked against its commitment this means
	// the manifest itself is inconsistent.
	ErrKCVMismatch = errors.New("safe: combined key does not match the manifest KCV")
)

// Combiner collects shares of one manifest and reconstructs the RMK once it
// holds the threshold. Every share is checked against its commitment before
// it is accepted, and the combined key against the KCV before it is returned:
// vault/shamir.Combine silently returns garbage for a bad share or too few
// shares, so its output is never trusted unchecked. A rejected share leaves
// the Combiner as it was. Not safe for concurrent use.
type Combiner struct {
	m      *safev1.GenesisManifest
	shares map[uint32]secret.Bytes
}

// NewCombiner returns a Combiner for the manifest.
func NewCombiner(m *safev1.GenesisManifest) (*Combiner, error) {
	if err := ValidateManifest(m); err != nil {
		return nil, err
	}
	return &Combiner{m: m, shares: map[uint32]secret.Bytes{}}, nil
}

// Check verifies a share against the manifest without accepting it.
func (c *Combiner) Check(index uint32, share secret.Bytes) error {
	if Slot(c.m, index) == nil {
		return fmt.Errorf("%w: index %d (manifest %s has %d shares)", ErrUnknownShare, index, c.m.GetGenesisId(), len(c.m.GetSlots()))
	}
	if _, dup := c.shares[index]; dup {
		return fmt.Errorf("%w: index %d", ErrDuplicateShare, index)
	}
	return checkCommitment(c.m, index, share)
}

func checkCommitment(m *safev1.GenesisManifest, index uint32, share secret.Bytes) error {
	b := share.Data()
	defer clear(b)
	ref := ShareRef{GenesisID: m.GetGenesisId(), Epoch: m.GetEpoch(), Index: index}
	if len(b) == 0 || !hmac.Equal(Commitment(ref, b), Slot(m, index).GetCommitment()) {
		return fmt.Errorf("%w: index %d", ErrBadShare, index)
	}
	return nil
}

// Add checks and accepts a share. The Combiner keeps its own copy; the
// caller still owns share.
func (c *Combiner) Add(index uint32, share secret.Bytes) error {
	if err := c.Check(index, share); err != nil {
		return err
	}
	b := share.Data()
	c.shares[index] = secret.New(b)
	clear(b)
	return nil
}

// Indices returns the accepted share indices in ascending order.
func (c *Combiner) Indices() []uint32 {
	out := make([]uint32, 0, len(c.shares))
	for i := range c.shares {
		out = append(out, i)
	}
	slices.Sort(out)
	return out
}

// Threshold returns K.
func (c *Combiner) Threshold() int { return int(c.m.GetThreshold()) }

// Ready reports whether the threshold is met.
func (c *Combiner) Ready() bool { return len(c.shares) >= c.Threshold() }

// Combine reconstructs the RMK from the first K accepted shares (by index)
// and checks it against the manifest KCV. The caller owns (and must wipe)
// the returned key.
func (c *Combiner) Combine() (secret.Bytes, error) {
	if !c.Ready() {
		return secret.Bytes{}, fmt.Errorf("%w (%d/%d)", ErrThresholdNotMet, len(c.shares), c.Threshold())
	}
	parts := make([][]byte, 0, c.Threshold())
	defer func() {
		for _, p := range parts {
			clear(p)
		}
	}()
	for _, i := range c.Indices()[:c.Threshold()] {
		parts = append(parts, c.shares[i].Data())
	}
	raw, err := shamir.Combine(parts)
	if err != nil {
		return secret.Bytes{}, fmt.Errorf("safe: combining shares: %w", err)
	}
	rmk := secret.New(raw)
	clear(raw)
	if !CheckKCV(rmk, c.m) {
		rmk.Wipe()
		return secret.Bytes{}, ErrKCVMismatch
	}
	return rmk, nil
}

// Wipe drops every accepted share.
func (c *Combiner) Wipe() {
	for i, s := range c.shares {
		s.Wipe()
		delete(c.shares, i)
	}
}

// Remove drops the accepted share of index, if any (a ceremony that could
// not use its last share takes it back, so it can be submitted again).
func (c *Combiner) Remove(index uint32) {
	if s, ok := c.shares[index]; ok {
		s.Wipe()
		delete(c.shares, index)
	}
}
