// Package bundle is the config bundle format: everything one region's KMS
// servers serve, as deterministic protobuf bytes (cairn.bundle.v1.Bundle),
// named by region, serial and SHA-256, and signed with Ed25519 by a
// bundle-signing key whose public half every KMS server pins.
//
// Receivers verify the signature over the exact bytes before parsing them,
// then validate the content; nothing in a bundle is trusted before both.
package bundle

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/keysets"
	"github.com/cairnkms/cairn/internal/region"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
)

// FormatVersion is the bundle format this package writes. It reads it and
// every version from OldestFormatVersion on.
//
// Format 2 added not_after: required in a format 2 bundle, absent from a
// format 1 bundle (built before expiry existed; such a bundle never
// expires, and only the serial floor stops its replay).
const FormatVersion = 2

// OldestFormatVersion is the oldest bundle format this package reads.
const OldestFormatVersion = 1

// DefaultValidity is how long after its created_at a bundle stays
// applicable unless regionctl is told otherwise (bundle build --valid-for).
// Thirty days: well past any rollout (stages bake for hours), and short
// enough that a bundle built and never pushed, or kept by someone, stops
// being a thing anyone can apply within a month. A KMS keeps serving an
// applied bundle past its not_after (see NotAfter); the expiry only stops
// new applies of it.
const DefaultValidity = 30 * 24 * time.Hour

// MaxValidity bounds not_after - created_at: a bundle that stays
// applicable for years is a replay waiting to happen.
const MaxValidity = 366 * 24 * time.Hour

// DestroyedRetention is how long after a version's destruction a bundle
// still names it (KeysetConfig.destroyed_key_ids), so a server that still
// holds it may drop it without the drop counting against the shrink guard.
// It matches DefaultValidity: a region whose servers missed a month of
// retirements is no routine case, and its catch-up bundle needs a signed
// shrink override; the list stays bounded by a month of rotations.
const DestroyedRetention = DefaultValidity

// MaxSize bounds a serialized bundle (100k keysets of a few hundred bytes
// fit comfortably).
const MaxSize = 256 << 20

// DefaultEncryptLimit is the AES-GCM message budget of a key version when a
// keyset's encrypt_limit is 0: Tink's AES-GCM draws a random 96-bit nonce
// per message, which keeps the chance of a nonce collision acceptable (below
// 2^-32) for about 2^32 messages under one key.
const DefaultEncryptLimit uint64 = 1 << 32

// EncryptLimit is k's encrypt_limit, or DefaultEncryptLimit if it is 0.
func EncryptLimit(k *bundlev1.KeysetConfig) uint64 {
	if l := k.GetEncryptLimit(); l != 0 {
		return l
	}
	return DefaultEncryptLimit
}

// signingContext prefixes the signed bytes, so a bundle signature can never
// be replayed as a signature over anything else.
const signingContext = "cairn/bundle/v1\x00"

// Errors receivers branch on.
var (
	ErrSignature = errors.New("bundle: signature does not verify under any pinned bundle-signing key")
	ErrInvalid   = errors.New("bundle: invalid bundle")
	// ErrExpired: the bundle is past its not_after (CheckFresh).
	ErrExpired = errors.New("bundle: bundle expired")
)

// NotAfter returns b's not_after, and false if it has none (format 1).
func NotAfter(b *bundlev1.Bundle) (time.Time, bool) {
	if b.GetNotAfter() == nil {
		return time.Time{}, false
	}
	return b.GetNotAfter().AsTime(), true
}

// Expired reports whether b is past its not_after at now (never for a
// bundle without one).
func Expired(b *bundlev1.Bundle, now time.Time) bool {
	na, ok := NotAfter(b)
	return ok && now.After(na)
}

// CheckFresh returns an ErrExpired error naming b's not_after if b is
// expired at now. A KMS calls it before applying a bundle, never before
// serving one it has applied.
func CheckFresh(b *bundlev1.Bundle, now time.Time) error {
	if !Expired(b, now) {
		return nil
	}
	na, _ := NotAfter(b)
	return fmt.Errorf("%w: serial %d of %s is valid until its not_after %s (it is now %s); build and push a fresh bundle (regionctl bundle build)",
		ErrExpired, b.GetSerial(), b.GetRegion(), na.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
}

// KeyID names an Ed25519 public key: the first 8 bytes of its SHA-256, hex.
func KeyID(pub ed25519.PublicKey) string {
	h := sha256.Sum256(pub)
	return hex.EncodeToString(h[:8])
}

// Marshal returns the deterministic encoding of b.
func Marshal(b *bundlev1.Bundle) ([]byte, error) {
	return proto.MarshalOptions{Deterministic: true}.Marshal(b)
}

// Sign validates b, encodes it deterministically and signs it.
func Sign(b *bundlev1.Bundle, key ed25519.PrivateKey) (*bundlev1.SignedBundle, error) {
	if err := Validate(b); err != nil {
		return nil, err
	}
	raw, err := Marshal(b)
	if err != nil {
		return nil, fmt.Errorf("bundle: encoding: %w", err)
	}
	if len(raw) > MaxSize {
		return nil, fmt.Errorf("%w: %d bytes, more than %d", ErrInvalid, len(raw), MaxSize)
	}
	msg := append([]byte(signingContext), raw...)
	return &bundlev1.SignedBundle{Bundle: raw, Signature: ed25519.Sign(key, msg), SigningKeyId: KeyID(key.Public().(ed25519.PublicKey))}, nil
}

// Ref names a signed bundle by region, serial and the SHA-256 of its bytes.
func Ref(sb *bundlev1.SignedBundle, b *bundlev1.Bundle) *bundlev1.BundleRef {
	h := sha256.Sum256(sb.GetBundle())
	return &bundlev1.BundleRef{Region: b.GetRegion(), Serial: b.GetSerial(), Sha256: h[:]}
}

// Verify checks the signature against the pinned keys over the exact bytes,
// then decodes and validates the bundle.
func Verify(sb *bundlev1.SignedBundle, pinned []ed25519.PublicKey) (*bundlev1.Bundle, error) {
	if sb == nil || len(sb.GetBundle()) == 0 {
		return nil, fmt.Errorf("%w: empty", ErrInvalid)
	}
	if len(sb.GetBundle()) > MaxSize {
		return nil, fmt.Errorf("%w: %d bytes, more than %d", ErrInvalid, len(sb.GetBundle()), MaxSize)
	}
	msg := append([]byte(signingContext), sb.GetBundle()...)
	ok := false
	for _, pub := range pinned {
		if len(pub) == ed25519.PublicKeySize && ed25519.Verify(pub, msg, sb.GetSignature()) {
			ok = true
			break
		}
	}
	if !ok {
		return nil, fmt.Errorf("%w (signing key id %q)", ErrSignature, sb.GetSigningKeyId())
	}
	// Unknown fields are dropped, so the determinism check below refuses
	// them wherever they are: signed content this reader cannot interpret
	// is refused, not carried along (new meaning needs a new format_version).
	var b bundlev1.Bundle
	if err := (proto.UnmarshalOptions{DiscardUnknown: true}).Unmarshal(sb.GetBundle(), &b); err != nil {
		return nil, fmt.Errorf("%w: signed bytes do not decode: %v", ErrInvalid, err)
	}
	// Deterministic bytes: a re-encoding must give the signed bytes, so two
	// bundles with the same content always have the same hash. Checked
	// beside Validate (both only read b): a KMS boot waits for both.
	canonical := make(chan bool, 1)
	go func() {
		re, err := Marshal(&b)
		canonical <- err == nil && bytes.Equal(re, sb.GetBundle())
	}()
	verr := Validate(&b)
	isCanonical := <-canonical
	if verr != nil { // first: it names the problem (a newer format version, say)
		return nil, verr
	}
	if !isCanonical {
		return nil, fmt.Errorf("%w: not in deterministic encoding", ErrInvalid)
	}
	return &b, nil
}

// Validate checks a bundle's content: format, region, serial, the shrink
// override and partial-build record if present (a reason and a SPIFFE ID
// each), and every keyset (sorted, unique, encrypted for this region under a
// listed region key version, purpose, TTL, ACL patterns parse).
func Validate(b *bundlev1.Bundle) error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, a...))
	}
	switch {
	case b == nil:
		return bad("no bundle")
	case b.GetFormatVersion() < OldestFormatVersion || b.GetFormatVersion() > FormatVersion:
		return bad("format version %d, this binary reads %d to %d", b.GetFormatVersion(), OldestFormatVersion, FormatVersion)
	case region.ValidName(b.GetRegion()) != nil:
		return bad("region %q is not a valid region name", b.GetRegion())
	case b.GetSerial() == 0:
		return bad("serial 0; serials start at 1")
	case len(b.GetRegionKeyVersions()) == 0 && len(b.GetKeysets()) > 0:
		return bad("no region key versions listed")
	}
	if err := checkValidity(b); err != nil {
		return bad("%v", err)
	}
	td, err := trustDomainOf(b.GetCreatedBy())
	if err != nil {
		return bad("created_by %q: %v", b.GetCreatedBy(), err)
	}
	if err := checkOverrides(b); err != nil {
		return bad("%v", err)
	}
	if err := checkQuotas(b, td); err != nil {
		return bad("%v", err)
	}
	return validateKeysets(b, td)
}

// checkValidity checks created_at and not_after: a format 1 bundle has no
// not_after; a format 2 bundle has a valid created_at and a not_after after
// it, at most MaxValidity later.
func checkValidity(b *bundlev1.Bundle) error {
	if b.GetFormatVersion() < 2 {
		if b.GetNotAfter() != nil {
			return fmt.Errorf("format version %d has no not_after; this one has one", b.GetFormatVersion())
		}
		return nil
	}
	switch {
	case b.GetCreatedAt() == nil || b.GetCreatedAt().CheckValid() != nil:
		return errors.New("no valid created_at")
	case b.GetNotAfter() == nil:
		return errors.New("no not_after (every bundle of format version 2 expires)")
	case b.GetNotAfter().CheckValid() != nil:
		return fmt.Errorf("not_after: %v", b.GetNotAfter().CheckValid())
	}
	created, notAfter := b.GetCreatedAt().AsTime(), b.GetNotAfter().AsTime()
	switch validity := notAfter.Sub(created); {
	case validity <= 0:
		return fmt.Errorf("not_after %s is not after created_at %s", notAfter.UTC().Format(time.RFC3339), created.UTC().Format(time.RFC3339))
	case validity > MaxValidity:
		return fmt.Errorf("not_after %s is %v after created_at, more than %v", notAfter.UTC().Format(time.RFC3339), validity, MaxValidity)
	}
	return nil
}

// parallelFrom is the number of keysets from which Validate checks them on
// several goroutines (a bundle of 100k keysets is checked at every KMS boot).
const parallelFrom = 4096

// validateKeysets checks every keyset of b, in chunks on up to GOMAXPROCS
// goroutines for a large bundle. It returns the error of the lowest-indexed
// bad keyset, the same error a check in order would find first.
func validateKeysets(b *bundlev1.Bundle, td spiffeid.TrustDomain) error {
	kss := b.GetKeysets()
	workers := 1
	if len(kss) >= parallelFrom {
		workers = min(runtime.GOMAXPROCS(0), len(kss)/(parallelFrom/4))
	}
	if workers <= 1 {
		return checkKeysets(b, td, 0, len(kss))
	}
	errs := make([]error, workers)
	var wg sync.WaitGroup
	per := (len(kss) + workers - 1) / workers
	for w := range workers {
		lo, hi := w*per, min((w+1)*per, len(kss))
		wg.Go(func() { errs[w] = checkKeysets(b, td, lo, hi) })
	}
	wg.Wait()
	for _, err := range errs { // in chunk order: the first is the lowest index
		if err != nil {
			return err
		}
	}
	return nil
}

// checkKeysets checks keysets [lo, hi) of b and returns the first error.
func checkKeysets(b *bundlev1.Bundle, td spiffeid.TrustDomain, lo, hi int) error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, a...))
	}
	kss := b.GetKeysets()
	for i := lo; i < hi; i++ {
		k := kss[i]
		var prev string
		if i > 0 {
			prev = kss[i-1].GetName()
		}
		// where is only formatted for an error: a valid bundle of 100k
		// keysets must not pay for 100k Sprintf calls.
		where := keysetWhere{i, k.GetName()}
		switch {
		case keysets.ValidName(k.GetName()) != nil:
			return bad("%s: invalid name", where)
		case i > 0 && k.GetName() <= prev:
			return bad("%s: keysets must be sorted by name and unique (after %q)", where, prev)
		case k.GetOwnerTeam() == "":
			return bad("%s: no owner team", where)
		case k.GetPurpose() != bundlev1.Purpose_PURPOSE_ENVELOPE:
			return bad("%s: purpose %v; only PURPOSE_ENVELOPE is served", where, k.GetPurpose())
		case k.GetKeyset() == nil:
			return bad("%s: no encrypted keyset", where)
		case k.GetKeyset().GetName() != k.GetName() || k.GetKeyset().GetRegion() != b.GetRegion():
			return bad("%s: encrypted keyset is %q for region %q", where, k.GetKeyset().GetName(), k.GetKeyset().GetRegion())
		case !slices.Contains(b.GetRegionKeyVersions(), k.GetKeyset().GetRegionKeyVersion()):
			return bad("%s: encrypted under region key version %d, which the bundle does not list", where, k.GetKeyset().GetRegionKeyVersion())
		case k.GetCiphertextTtl().AsDuration() <= 0:
			return bad("%s: ciphertext TTL must be positive", where)
		case k.GetRotationPeriod().AsDuration() < 0:
			return bad("%s: negative rotation period", where)
		case !slices.Contains(k.GetRegions(), b.GetRegion()):
			return bad("%s: its regions %v do not include %q", where, k.GetRegions(), b.GetRegion())
		}
		acl := k.GetAcl()
		for _, op := range [...]struct {
			name     string
			patterns []string
		}{{"encrypt", acl.GetEncrypt()}, {"decrypt", acl.GetDecrypt()}, {"generate_data_key", acl.GetGenerateDataKey()}, {"rewrap", acl.GetRewrap()}} {
			for _, p := range op.patterns {
				if _, err := identity.ParsePattern(p, td); err != nil {
					return bad("%s: ACL %s: %v", where, op.name, err)
				}
			}
		}
		if err := checkSafetyFields(k); err != nil {
			return bad("%s: %v", where, err)
		}
	}
	return nil
}

// checkSafetyFields checks what a keyset carries from the record for the
// Safety Condition: ttl_history (if present: periods in order, not
// overlapping, positive TTLs, every one but the last closed, the last open
// and equal to ciphertext_ttl), lifecycle (key IDs unique and held by the
// copy), destroyed_key_ids (sorted, unique, none held by the copy) and
// propagation_window (not negative). All are optional: a bundle built
// before they existed has none.
//
// The message budget needs no check: every encrypt_limit is meaningful (0
// is DefaultEncryptLimit, any other value a limit), and a lifecycle
// encrypt_count at or past the limit is no bad bundle but a version the
// KMS refuses to encrypt with (it still decrypts).
func checkSafetyFields(k *bundlev1.KeysetConfig) error {
	if w := k.GetPropagationWindow(); w != nil {
		if err := w.CheckValid(); err != nil {
			return fmt.Errorf("propagation_window: %v", err)
		}
		if w.AsDuration() < 0 {
			return fmt.Errorf("propagation_window %v is negative", w.AsDuration())
		}
	}
	hist := k.GetTtlHistory()
	var prevUntil time.Time
	for i, p := range hist {
		last := i == len(hist)-1
		switch {
		case p.GetTtl().CheckValid() != nil || p.GetTtl().AsDuration() <= 0:
			return fmt.Errorf("ttl_history[%d]: TTL must be positive", i)
		case p.GetFrom() == nil || p.GetFrom().CheckValid() != nil:
			return fmt.Errorf("ttl_history[%d]: no valid from", i)
		case i > 0 && p.GetFrom().AsTime().Before(prevUntil):
			return fmt.Errorf("ttl_history[%d]: from %s is before the previous period's until %s (periods must be in order and not overlap)",
				i, p.GetFrom().AsTime().Format(time.RFC3339Nano), prevUntil.Format(time.RFC3339Nano))
		case last && p.GetUntil() != nil:
			return fmt.Errorf("ttl_history[%d]: the last period must be open (no until)", i)
		case last && p.GetTtl().AsDuration() != k.GetCiphertextTtl().AsDuration():
			return fmt.Errorf("ttl_history[%d]: the period in force has TTL %v, ciphertext_ttl is %v", i, p.GetTtl().AsDuration(), k.GetCiphertextTtl().AsDuration())
		case !last && (p.GetUntil() == nil || p.GetUntil().CheckValid() != nil):
			return fmt.Errorf("ttl_history[%d]: only the last period may be open (no valid until)", i)
		case !last && p.GetUntil().AsTime().Before(p.GetFrom().AsTime()):
			return fmt.Errorf("ttl_history[%d]: until is before from", i)
		}
		if !last {
			prevUntil = p.GetUntil().AsTime()
		}
	}
	destroyed := k.GetDestroyedKeyIds()
	for i, id := range destroyed {
		switch {
		case i > 0 && id <= destroyed[i-1]:
			return fmt.Errorf("destroyed_key_ids[%d]: key %d after key %d (the list must be sorted and unique)", i, id, destroyed[i-1])
		case slices.ContainsFunc(k.GetKeyset().GetVersions(), func(v *cryptov1.KeyVersionInfo) bool { return v.GetKeyId() == id }):
			return fmt.Errorf("destroyed_key_ids[%d]: key %d is a version of the encrypted keyset, not destroyed", i, id)
		}
	}
	if len(k.GetLifecycle()) == 0 {
		return nil
	}
	held := make(map[uint32]bool, len(k.GetKeyset().GetVersions()))
	for _, v := range k.GetKeyset().GetVersions() {
		held[v.GetKeyId()] = true
	}
	seen := make(map[uint32]bool, len(k.GetLifecycle()))
	for i, l := range k.GetLifecycle() {
		switch {
		case seen[l.GetKeyId()]:
			return fmt.Errorf("lifecycle[%d]: key %d appears twice", i, l.GetKeyId())
		case !held[l.GetKeyId()]:
			return fmt.Errorf("lifecycle[%d]: key %d is not a version of the encrypted keyset", i, l.GetKeyId())
		}
		seen[l.GetKeyId()] = true
		for _, ts := range [...]struct {
			name string
			t    interface{ CheckValid() error }
			set  bool
		}{
			{"propagated_everywhere", l.GetPropagatedEverywhere(), l.GetPropagatedEverywhere() != nil},
			{"primary_since", l.GetPrimarySince(), l.GetPrimarySince() != nil},
			{"superseded_at", l.GetSupersededAt(), l.GetSupersededAt() != nil},
		} {
			if ts.set {
				if err := ts.t.CheckValid(); err != nil {
					return fmt.Errorf("lifecycle[%d]: key %d: %s: %v", i, l.GetKeyId(), ts.name, err)
				}
			}
		}
	}
	return nil
}

// trustDomainOf returns the trust domain relative ACL patterns resolve
// against: that of the regionctl identity that built the bundle.
func trustDomainOf(createdBy string) (spiffeid.TrustDomain, error) {
	id, err := identity.Parse(createdBy)
	if err != nil {
		return spiffeid.TrustDomain{}, err
	}
	return id.TrustDomain(), nil
}

// TrustDomain returns the trust domain relative ACL patterns of b resolve in.
func TrustDomain(b *bundlev1.Bundle) (spiffeid.TrustDomain, error) {
	return trustDomainOf(b.GetCreatedBy())
}

// GenerateKey makes a bundle-signing key pair.
func GenerateKey() (ed25519.PublicKey, ed25519.PrivateKey, error) {
	return ed25519.GenerateKey(nil)
}

// WriteKeys writes a signing key (PKCS#8-free raw seed PEM, mode 0600) and its
// public half (mode 0644).
func WriteKeys(privPath, pubPath string, priv ed25519.PrivateKey) error {
	if err := os.MkdirAll(filepath.Dir(privPath), 0o700); err != nil {
		return err
	}
	seed := priv.Seed()
	defer clear(seed)
	if err := writeExclusive(privPath, pem.EncodeToMemory(&pem.Block{Type: "CAIRN BUNDLE SIGNING KEY", Bytes: seed}), 0o600); err != nil {
		return err
	}
	return writeExclusive(pubPath, pem.EncodeToMemory(&pem.Block{Type: "CAIRN BUNDLE PUBLIC KEY", Bytes: priv.Public().(ed25519.PublicKey)}), 0o644)
}

func writeExclusive(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return fmt.Errorf("bundle: %w", err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("bundle: %w", err)
	}
	return f.Close()
}

// ReadPrivateKey reads a signing key written by WriteKeys; it refuses a file
// readable by group or others.
func ReadPrivateKey(path string) (ed25519.PrivateKey, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("bundle: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("bundle: signing key %s has mode %v; chmod 600 it", path, fi.Mode().Perm())
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("bundle: %w", err)
	}
	defer clear(data)
	blk, _ := pem.Decode(data)
	if blk == nil || blk.Type != "CAIRN BUNDLE SIGNING KEY" || len(blk.Bytes) != ed25519.SeedSize {
		return nil, fmt.Errorf("bundle: %s is not a Cairn bundle signing key", path)
	}
	defer clear(blk.Bytes)
	return ed25519.NewKeyFromSeed(blk.Bytes), nil
}

// ReadPublicKey reads a public key written by WriteKeys.
func ReadPublicKey(path string) (ed25519.PublicKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("bundle: %w", err)
	}
	blk, _ := pem.Decode(data)
	if blk == nil || blk.Type != "CAIRN BUNDLE PUBLIC KEY" || len(blk.Bytes) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("bundle: %s is not a Cairn bundle public key", path)
	}
	return ed25519.PublicKey(blk.Bytes), nil
}

// keysetWhere names a keyset in a validation error; it formats only when
// printed.
type keysetWhere struct {
	index int
	name  string
}

func (w keysetWhere) String() string { return fmt.Sprintf("keyset %d (%q)", w.index, w.name) }
