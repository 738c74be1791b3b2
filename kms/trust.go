package kms

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/internal/identity"
)

// Trust is what a server trusts on its admin API: the pinned bundle-signing
// public keys a bundle must verify under, and the allowlist of identities
// that may call KMSAdmin. It starts as Config.SigningKeys and Config.Admins
// and can be replaced while serving (SetTrust), e.g. when a signing key is
// rotated or an operator leaves, without a restart.
type Trust struct {
	SigningKeys []ed25519.PublicKey
	Admins      identity.Allowlist
}

// Validate reports a Trust that cannot work: no signing key, a key of the
// wrong size, or an empty allowlist (nobody could push a bundle).
func (t Trust) Validate() error {
	var errs []error
	if len(t.SigningKeys) == 0 {
		errs = append(errs, errors.New("kms: no pinned bundle-signing keys"))
	}
	for i, k := range t.SigningKeys {
		if len(k) != ed25519.PublicKeySize {
			errs = append(errs, fmt.Errorf("kms: signing key %d is %d bytes, want %d", i, len(k), ed25519.PublicKeySize))
		}
	}
	if len(t.Admins.Patterns()) == 0 {
		errs = append(errs, errors.New("kms: an empty admin allowlist (nobody could call KMSAdmin)"))
	}
	return errors.Join(errs...)
}

// KeyIDs names the signing keys (bundle.KeyID), sorted.
func (t Trust) KeyIDs() []string {
	ids := make([]string, len(t.SigningKeys))
	for i, k := range t.SigningKeys {
		ids[i] = bundle.KeyID(k)
	}
	slices.Sort(ids)
	return ids
}

// AdminPatterns are the allowlist's patterns, as written.
func (t Trust) AdminPatterns() []string {
	var out []string
	for _, p := range t.Admins.Patterns() {
		out = append(out, p.String())
	}
	return out
}

// Equal reports whether t and o trust the same keys and the same patterns
// (in any order).
func (t Trust) Equal(o Trust) bool {
	a, b := t.AdminPatterns(), o.AdminPatterns()
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(t.KeyIDs(), o.KeyIDs()) && slices.Equal(a, b)
}

// trust is the Trust in force, immutable once stored.
type trust struct {
	keys   []ed25519.PublicKey
	admins identity.Allowlist
}

// signingKeys returns the pinned bundle-signing keys in force.
func (s *Server) signingKeys() []ed25519.PublicKey { return s.trust.Load().keys }

// authorizeAdmin is KMSAdmin's access policy: the allowlist in force at the
// time of the call.
func (s *Server) authorizeAdmin(id identity.ID) error { return s.trust.Load().admins.Authorize(id) }

// CurrentTrust returns the Trust in force.
func (s *Server) CurrentTrust() Trust {
	t := s.trust.Load()
	return Trust{SigningKeys: slices.Clone(t.keys), Admins: t.admins}
}

// SetTrust replaces the pinned signing keys and the admin allowlist at once
// (one atomic swap: a call sees the old pair or the new one, never a mix).
// An invalid Trust changes nothing. The change is audited (fail closed: no
// record, no change) and logged with the new key IDs and patterns. Calls in
// flight finish under the trust they started with; a bundle already served
// keeps being served (it was verified when applied), and so is the persisted
// one at the next start only if a key of the new set verifies it.
func (s *Server) SetTrust(t Trust) error {
	if err := t.Validate(); err != nil {
		return err
	}
	next := &trust{keys: slices.Clone(t.SigningKeys), admins: t.Admins}
	s.trustMu.Lock()
	defer s.trustMu.Unlock()
	old := s.trust.Load()
	oldT := Trust{SigningKeys: old.keys, Admins: old.admins}
	if oldT.Equal(t) {
		return nil
	}
	ids, patterns := t.KeyIDs(), t.AdminPatterns()
	rec := audit.Record{
		Identity: s.cfg.Source.ID().String(), Operation: "kms/SetTrust",
		Target:  audit.Target{Region: s.cfg.Region, Resource: "signing keys " + strings.Join(ids, ",")},
		Outcome: audit.OutcomeOK,
		Reason: fmt.Sprintf("pinned bundle-signing keys now %s (were %s); admins now %s (were %s)",
			strings.Join(ids, ","), strings.Join(oldT.KeyIDs(), ","), strings.Join(patterns, ","), strings.Join(oldT.AdminPatterns(), ",")),
	}
	if err := s.cfg.Audit.Write(context.Background(), rec); err != nil {
		return fmt.Errorf("%w: cannot record the trust change, so it is not made: %v", errAudit, err)
	}
	s.trust.Store(next)
	s.log.Info("kms: trust reloaded", "signing_key_ids", ids, "admins", patterns,
		"previous_signing_key_ids", oldT.KeyIDs(), "previous_admins", oldT.AdminPatterns())
	return nil
}
