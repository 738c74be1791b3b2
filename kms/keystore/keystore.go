// Package keystore is the regional KMS's keysets in RAM: an immutable
// snapshot built from one verified config bundle and the region key versions
// that encrypt its keysets. It imports no gRPC.
//
// A Store is built off to the side (Build decrypts every keyset and refuses
// the whole bundle if any one fails), checked against the Store served now
// (CheckSafety), and then swapped in by its owner with an atomic pointer.
// Requests only read it: a map lookup for the keyset, an allocation-free ACL
// match, the Tink AEAD, and atomic usage counters. The counters of a key
// version are shared by every snapshot that holds it, so usage history
// survives bundle updates.
package keystore

import (
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/tink-crypto/tink-go/v2/keyset"
	tinkpb "github.com/tink-crypto/tink-go/v2/proto/tink_go_proto"
	"github.com/tink-crypto/tink-go/v2/tink"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/safety"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
)

// Errors callers branch on (the KMS maps them to gRPC codes in one table).
var (
	// ErrDecrypt is the one error of every ciphertext that does not decrypt
	// under a version the keyset holds enabled: wrong associated data,
	// truncated, tampered or garbage. Telling these apart would be an
	// oracle.
	ErrDecrypt = errors.New("keystore: ciphertext does not decrypt")
	// ErrVersionGone is the error of a ciphertext whose TINK prefix names a
	// key version the keyset does not hold enabled (destroyed, disabled,
	// never delivered to this region, or another keyset's). The key ID is
	// in the clear in the ciphertext, so saying this reveals nothing about
	// the plaintext; the KMS tells it (NotFound) only to callers already on
	// one of the keyset's ACLs, so an operation can be debugged.
	ErrVersionGone = errors.New("keystore: key version not held")
	// ErrEncrypt is an encryption failure inside the AEAD (not expected).
	ErrEncrypt = errors.New("keystore: encryption failed")
	// ErrBuild wraps every reason Build refuses a bundle.
	ErrBuild = errors.New("keystore: bundle refused")
	// ErrBudget refuses an encryption with a version that used up its
	// AES-GCM message budget (Version.Budget). The version still decrypts;
	// the keyset needs a new primary.
	ErrBudget = errors.New("keystore: encryption refused")
)

// Store is one immutable snapshot of every keyset a bundle holds.
type Store struct {
	keysets map[string]*Keyset
	names   []string // sorted
}

// Keyset returns the named keyset.
func (s *Store) Keyset(name string) (*Keyset, bool) {
	k, ok := s.keysets[name]
	return k, ok
}

// Len returns the number of keysets.
func (s *Store) Len() int { return len(s.names) }

// Names returns the keysets' names in name order. The slice is the store's
// own (it is immutable): do not modify it.
func (s *Store) Names() []string { return s.names }

// Keysets returns the keysets in name order.
func (s *Store) Keysets() []*Keyset {
	out := make([]*Keyset, len(s.names))
	for i, n := range s.names {
		out[i] = s.keysets[n]
	}
	return out
}

// Build decrypts every keyset of b (which bundle.Verify has validated) with
// the region key versions in regionKeys and returns a new Store. Versions
// that prev also holds (same keyset name and key ID) share prev's usage
// counters, and keysets prev holds carry on its TTL history, with the
// bundle's ciphertext TTL in force from now (if it changed). Any failure refuses the whole bundle, wrapping ErrBuild, with a
// message naming the keyset.
//
// What a keyset holds is taken from the decrypted keyset only; the
// EncryptedKeyset's public metadata (primary, key IDs, statuses) is an
// unauthenticated hint, and a hint that disagrees with the contents refuses
// the bundle. Every key must use the TINK output prefix, which routes
// ciphertexts to versions.
func Build(b *bundlev1.Bundle, regionKeys map[uint32]tink.AEAD, prev *Store, now time.Time) (*Store, error) {
	td, err := bundle.TrustDomain(b)
	if err != nil {
		return nil, fmt.Errorf("%w: created_by: %v", ErrBuild, err)
	}
	cfgs := b.GetKeysets()
	out := &Store{keysets: make(map[string]*Keyset, len(cfgs)), names: make([]string, 0, len(cfgs))}
	built := make([]*Keyset, len(cfgs))
	errs := make([]error, len(cfgs))

	// Decrypting and building AEADs is CPU-bound and independent per
	// keyset: spread it over the CPUs (100k keysets must load in seconds).
	workers := min(runtime.GOMAXPROCS(0), max(1, len(cfgs)/64))
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			acls := aclCache{td: td, parsed: make(map[string]*[numOps]identity.Allowlist)}
			for i := w; i < len(cfgs); i += workers {
				built[i], errs[i] = buildKeyset(cfgs[i], b.GetRegion(), &acls, regionKeys, prev, now)
			}
		})
	}
	wg.Wait()
	for i, k := range built {
		if errs[i] != nil {
			return nil, fmt.Errorf("%w: keyset %q: %v", ErrBuild, cfgs[i].GetName(), errs[i])
		}
		if _, dup := out.keysets[k.name]; dup {
			return nil, fmt.Errorf("%w: keyset %q appears twice", ErrBuild, k.name)
		}
		out.keysets[k.name] = k
		out.names = append(out.names, k.name)
	}
	slices.Sort(out.names)
	return out, nil
}

// aclCache parses each distinct ACL (the four lists of patterns) once per
// Build worker: the keysets of a bundle mostly share a handful of ACLs, and
// Allowlists are immutable, so keysets with the same ACL share one.
type aclCache struct {
	td     spiffeid.TrustDomain
	parsed map[string]*[numOps]identity.Allowlist
	key    []byte // scratch for the map key
}

func (c *aclCache) acl(acl *bundlev1.Acl) (*[numOps]identity.Allowlist, error) {
	lists := [numOps][]string{acl.GetEncrypt(), acl.GetDecrypt(), acl.GetGenerateDataKey(), acl.GetRewrap()}
	// Length-prefixed, so that no two ACLs share a key (a pattern may hold
	// any byte until it is parsed).
	kb := c.key[:0]
	for _, patterns := range lists {
		kb = append(strconv.AppendInt(kb, int64(len(patterns)), 10), ';')
		for _, p := range patterns {
			kb = append(strconv.AppendInt(kb, int64(len(p)), 10), ':')
			kb = append(kb, p...)
		}
	}
	c.key = kb
	if a, ok := c.parsed[string(kb)]; ok {
		return a, nil
	}
	a := new([numOps]identity.Allowlist)
	for op, patterns := range lists {
		var err error
		if a[op], err = identity.ParseAllowlist(c.td, patterns...); err != nil {
			return nil, fmt.Errorf("ACL %s: %v", Op(op), err)
		}
	}
	c.parsed[string(kb)] = a
	return a, nil
}

func buildKeyset(cfg *bundlev1.KeysetConfig, region string, acls *aclCache, regionKeys map[uint32]tink.AEAD, prev *Store, now time.Time) (*Keyset, error) {
	ek := cfg.GetKeyset()
	switch {
	case ek == nil:
		return nil, errors.New("no encrypted keyset")
	case ek.GetName() != cfg.GetName() || ek.GetRegion() != region:
		return nil, fmt.Errorf("encrypted keyset is %q for region %q", ek.GetName(), ek.GetRegion())
	case cfg.GetCiphertextTtl().AsDuration() <= 0:
		return nil, errors.New("ciphertext TTL must be positive")
	}
	rk, ok := regionKeys[ek.GetRegionKeyVersion()]
	if !ok {
		return nil, fmt.Errorf("region key version %d is not available", ek.GetRegionKeyVersion())
	}
	ks, err := openKeyset(ek, rk)
	if err != nil {
		return nil, fmt.Errorf("region key version %d: %v", ek.GetRegionKeyVersion(), err)
	}
	defer wipeKeyset(ks)
	k := &Keyset{name: cfg.GetName(), ttl: cfg.GetCiphertextTtl().AsDuration()}
	var before *Keyset
	if prev != nil {
		before = prev.keysets[k.name]
	}
	var history []safety.TTLPeriod
	if before != nil {
		history = before.ttlHistory
	}
	k.ttlHistory = withTTL(history, k.ttl, now)
	k.setRecord(cfg)
	limit := bundle.EncryptLimit(cfg)
	hints := ek.GetVersions() // as many as keys: openKeyset checked
	keys := ks.GetKey()
	// A keyset of AES-GCM keys only gets its AEAD from the key material
	// (see load.go); any other through Tink.
	var (
		gcm     *gcmKeyset
		entries []*keyset.Entry
	)
	if allAESGCM(ks) {
		gcm = new(gcmKeyset)
	} else if k.aead, entries, err = tinkAEAD(ks); err != nil {
		return nil, err
	}
	k.versions = make([]*Version, 0, len(keys))
	for i, kk := range keys {
		if kk.GetOutputPrefixType() != tinkpb.OutputPrefixType_TINK {
			return nil, fmt.Errorf("key %d has output prefix %v; only TINK-prefixed keys are served", kk.GetKeyId(), kk.GetOutputPrefixType())
		}
		st, err := statusOf(kk.GetStatus(), kk.GetKeyId(), ks.GetPrimaryKeyId())
		if err != nil {
			return nil, fmt.Errorf("key %d: %v", kk.GetKeyId(), err)
		}
		if hints[i].GetKeyId() != kk.GetKeyId() || hints[i].GetStatus() != st {
			return nil, fmt.Errorf("public metadata says key %d is %v; the keyset says key %d is %v", hints[i].GetKeyId(), hints[i].GetStatus(), kk.GetKeyId(), st)
		}
		v := &Version{keyID: kk.GetKeyId(), status: st}
		if gcm != nil {
			if err := gcm.add(v, kk, ks.GetPrimaryKeyId()); err != nil {
				return nil, fmt.Errorf("key %d: %v", v.keyID, err)
			}
		} else if e := entries[i]; e != nil && e.KeyID() == v.keyID {
			v.params = e.Key().Parameters()
			v.setGCMKey(e.Key())
		}
		var old *Version
		if before != nil {
			old, _ = before.Version(v.keyID)
		}
		if old != nil {
			v.usage = old.usage
		} else {
			v.usage = new(Usage)
		}
		v.setBudget(limit, k.lifecycle[v.keyID].EncryptCount, old)
		if st == cryptov1.KeyStatus_KEY_STATUS_PRIMARY {
			k.primary = v
		}
		k.versions = append(k.versions, v)
	}
	if k.primary == nil {
		return nil, errors.New("no primary key")
	}
	if gcm != nil {
		k.aead = gcm
	}
	if k.acl, err = acls.acl(cfg.GetAcl()); err != nil {
		return nil, err
	}
	return k, nil
}

// add parses kk, an AES-GCM key, as v's (its parameters) and, if v
// decrypts, builds its cipher: g's, and v's for batches.
func (g *gcmKeyset) add(v *Version, kk *tinkpb.Keyset_Key, primary uint32) error {
	key, raw, err := parseAESGCMKey(kk)
	if err != nil {
		return err
	}
	defer clear(raw)
	v.params = key.Parameters()
	if !v.Decrypts() {
		return nil // Tink builds no primitive for it either
	}
	c, err := newAESGCM(raw)
	if err != nil {
		return fmt.Errorf("building the AEAD: %v", err)
	}
	if v.keyID == primary {
		g.primary = gcmKey{id: v.keyID, cipher: c}
	} else {
		g.others = append(g.others, gcmKey{id: v.keyID, cipher: c})
	}
	v.setGCMKey(key)
	if v.gcmKey != nil {
		v.gcmAEAD.Store(&gcmCipher{aead: c}) // the same cipher, not a second one
	}
	return nil
}

// setBudget fixes v's message budget for a new snapshot (see Version):
// the keyset's limit, and the fleet count to start from: the record's
// (recorded), or, if higher, what before (the same version in the snapshot
// served until now, or nil) counted: its starting count plus this server's
// encryptions with the version since. A bundle built from an older record
// (a rollback, a stale observation) so never hands back encryptions this
// server already counted.
//
// encBase is captured here, in Build, which runs just before the swap under
// the server's apply lock: the few encryptions the snapshot served until
// now makes in between count against both snapshots, the safe side. What
// is not counted is this server's encryptions after the observation the
// record's count comes from and before it applied the bundle, and, after a
// restart, those of the previous run after that observation (restored
// counters are history, not budget: RestoreUsage raises encBase with them).
// Rotating at a fraction of the limit (regionctl rotate --due) covers that
// gap, as it covers every server of the fleet spending the same remaining
// budget at once.
func (v *Version) setBudget(limit, recorded uint64, before *Version) {
	v.limit = limit
	v.encBase = v.usage.encrypts.Load()
	v.used = recorded
	if before != nil && v.encBase >= before.encBase {
		if carried := addSat(before.used, v.encBase-before.encBase); carried > v.used {
			v.used = carried
		}
	}
	if v.used < limit {
		v.budget = limit - v.used
	}
}

// addSat is a + b, or the largest uint64 if that overflows.
func addSat(a, b uint64) uint64 {
	if s := a + b; s >= a {
		return s
	}
	return ^uint64(0)
}

// statusOf is the status of key keyID as cryptov1 names it, the way
// keysets.Encrypt writes the public metadata.
func statusOf(status tinkpb.KeyStatusType, keyID, primary uint32) (cryptov1.KeyStatus, error) {
	switch status {
	case tinkpb.KeyStatusType_ENABLED:
		if keyID == primary {
			return cryptov1.KeyStatus_KEY_STATUS_PRIMARY, nil
		}
		return cryptov1.KeyStatus_KEY_STATUS_ENABLED, nil
	case tinkpb.KeyStatusType_DISABLED:
		return cryptov1.KeyStatus_KEY_STATUS_DISABLED, nil
	case tinkpb.KeyStatusType_DESTROYED:
		return cryptov1.KeyStatus_KEY_STATUS_DESTROYED, nil
	}
	return 0, fmt.Errorf("unknown status %v", status)
}

// setRecord keeps what cfg carries from the root KMS record for the Safety
// check (bundle.Validate has checked it).
func (k *Keyset) setRecord(cfg *bundlev1.KeysetConfig) {
	for _, p := range cfg.GetTtlHistory() {
		tp := safety.TTLPeriod{TTL: p.GetTtl().AsDuration(), From: p.GetFrom().AsTime()}
		if p.GetUntil() != nil {
			tp.Until = p.GetUntil().AsTime()
		}
		k.recordTTL = append(k.recordTTL, tp)
	}
	if lc := cfg.GetLifecycle(); len(lc) > 0 {
		k.lifecycle = make(map[uint32]Lifecycle, len(lc))
		for _, l := range lc {
			k.lifecycle[l.GetKeyId()] = Lifecycle{
				PropagatedEverywhere: timeOf(l.GetPropagatedEverywhere()),
				PrimarySince:         timeOf(l.GetPrimarySince()),
				SupersededAt:         timeOf(l.GetSupersededAt()),
				EncryptCount:         l.GetEncryptCount(),
			}
		}
	}
	k.window = cfg.GetPropagationWindow().AsDuration()
	k.regions = cfg.GetRegions()
}

// timeOf is t as a time.Time, zero if unset.
func timeOf(t *timestamppb.Timestamp) time.Time {
	if t == nil {
		return time.Time{}
	}
	return t.AsTime()
}

// withTTL is history with ttl in force from now (safety.WithTTL), without
// the closed periods whose ciphertexts are all past their TTL at now (they
// can no longer raise the effective TTL, and the history must not grow
// without bound).
func withTTL(history []safety.TTLPeriod, ttl time.Duration, now time.Time) []safety.TTLPeriod {
	return pruneTTL(safety.WithTTL(history, ttl, now), now)
}

// pruneTTL drops, in place, the closed periods of history that are over at
// now: Until + TTL ≤ now.
func pruneTTL(history []safety.TTLPeriod, now time.Time) []safety.TTLPeriod {
	return slices.DeleteFunc(history, func(tp safety.TTLPeriod) bool {
		return !tp.Until.IsZero() && !tp.Until.Add(tp.TTL).After(now)
	})
}
