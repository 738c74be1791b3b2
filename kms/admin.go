package kms

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/tink-crypto/tink-go/v2/tink"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/kms/keystore"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// adminAPI is kms.v1.KMSAdmin; the access policy lets only the admins in
// force (Config.Admins, or those of the last SetTrust) call it.
type adminAPI struct {
	kmsv1.UnimplementedKMSAdminServer
	s *Server
}

// ApplyBundle implements kms.v1.KMSAdmin.
func (a *adminAPI) ApplyBundle(ctx context.Context, req *kmsv1.ApplyBundleRequest) (resp *kmsv1.ApplyBundleResponse, err error) {
	s := a.s
	defer s.observe(opApplyBundle, time.Now(), &err)
	out, err := s.apply(ctx, req)
	if err != nil {
		s.log.Warn("kms: bundle refused", "dry_run", req.GetDryRun(), "err", err)
		return nil, toStatus(err)
	}
	return out, nil
}

// apply runs every check of ApplyBundle, builds the new keystore off to the
// side, and (unless dry run) persists the signed bundle and swaps. Every
// refusal happens before the persist, so a refused bundle changes nothing.
func (s *Server) apply(ctx context.Context, req *kmsv1.ApplyBundleRequest) (*kmsv1.ApplyBundleResponse, error) {
	if req.GetForce() || req.GetForceReason() != "" {
		return nil, fmt.Errorf("%w: %s", errInvalid, forceGone)
	}
	sb := req.GetBundle()
	// The signature covers the bundle bytes, not the wrapper around them.
	// The wrapper is persisted whole, and every read of the file checks
	// that it holds the signed bundle and nothing else (readHeldBundle):
	// fields this server does not know would be persisted unsigned, and
	// every later apply refused for them. Dropping them instead would drop,
	// unsaid, what a newer server may check. So they are refused, before
	// anything is persisted.
	if len(sb.ProtoReflect().GetUnknown()) > 0 {
		return nil, fmt.Errorf("%w: the signed bundle's wrapper (SignedBundle) has fields this server does not know, outside the signature; "+
			"upgrade the server, or rebuild the bundle with a regionctl of the server's version", errInvalid)
	}
	b, err := bundle.Verify(sb, s.signingKeys())
	if err != nil {
		return nil, err
	}
	if b.GetRegion() != s.cfg.Region {
		return nil, fmt.Errorf("%w: the bundle is for region %q, this server serves %q", errWrongRegion, b.GetRegion(), s.cfg.Region)
	}
	ref := bundle.Ref(sb, b)
	audit.AddTarget(ctx, audit.Target{Region: s.cfg.Region, Resource: fmt.Sprintf("bundle serial %d sha256 %x", ref.GetSerial(), ref.GetSha256())})

	s.applyMu.Lock()
	defer s.applyMu.Unlock()
	cur := s.cur.Load()
	var (
		curStore *keystore.Store
		held     map[uint32]tink.AEAD
	)
	floor := s.floor
	if cur != nil {
		floor, curStore, held = cur.ref, cur.store, cur.regionKeys
	}
	same := floor != nil && b.GetSerial() == floor.GetSerial() && bytes.Equal(ref.GetSha256(), floor.GetSha256())
	if floor != nil {
		switch {
		case same && cur != nil: // idempotent
			if !req.GetDryRun() {
				if err := s.repairBundleFiles(sb, ref); err != nil {
					return nil, err
				}
			}
			return &kmsv1.ApplyBundleResponse{Applied: ref, Previous: cur.ref}, nil
		case same:
			// The persisted bundle, pushed again before boot loaded it: load it now.
		case b.GetSerial() == floor.GetSerial():
			return nil, fmt.Errorf("%w: serial %d is already applied with different content (sha256 %x, this bundle %x)", errReplay, b.GetSerial(), floor.GetSha256(), ref.GetSha256())
		case b.GetSerial() < floor.GetSerial():
			return nil, fmt.Errorf("%w: serial %d is older than the applied serial %d", errReplay, b.GetSerial(), floor.GetSerial())
		}
	}
	if !same {
		// A bundle new to this server: not past its not_after, and not
		// below the region's floor in the record. (The bundle served, or
		// the persisted one, is served on past its not_after: serving never
		// stops because nobody pushed; GetStatus and
		// cairn_kms_bundle_expired say so.)
		if err := bundle.CheckFresh(b, s.cfg.Now()); err != nil {
			return nil, err
		}
		if err := s.checkRecordFloor(ctx, b, floor); err != nil {
			return nil, err
		}
	}

	// The shrink guard, against the bundle served (or, while nothing is
	// served, the persisted one waiting to load). Only the bundle's own
	// signed override lets it pass.
	served, servedSize, servedFile, err := s.servedBundle(cur)
	if err != nil {
		return nil, err
	}
	report, err := bundle.CheckShrink(served, b, servedSize, len(sb.GetBundle()), s.cfg.ShrinkGuard)
	if err != nil {
		return nil, fmt.Errorf("%w; if that is meant, build the bundle with regionctl bundle build --force-shrink --reason TEXT (the override is signed into it and audited by every server)", err)
	}
	// Signed overrides are audited before anything changes (fail closed),
	// dry runs included: each is a use of the override.
	var warnings []string
	if o := b.GetShrinkOverride(); o != nil {
		if err := s.auditOverride(ctx, ref, req.GetDryRun(), fmt.Sprintf("shrink override by %s: %s", o.GetForcedBy(), o.GetReason())); err != nil {
			return nil, err
		}
		w := fmt.Sprintf("the bundle carries a shrink override by %s (reason: %s), audited", o.GetForcedBy(), o.GetReason())
		switch {
		case served == nil:
			w += "; nothing was served to compare with"
		case report.Exceeded():
			w += "; it passed the shrink guard only by the override: " + strings.Join(report.Problems(), "; ")
		default:
			w += fmt.Sprintf("; not needed against serial %d (within the guard)", served.GetSerial())
		}
		warnings = append(warnings, w+"; the Safety Condition is never overridden")
	}
	if p := b.GetPartial(); p != nil {
		left := strings.Join(p.GetLeftOut(), "; ")
		if err := s.auditOverride(ctx, ref, req.GetDryRun(), fmt.Sprintf("partial build by %s: %s; left out: %s", p.GetBuiltBy(), p.GetReason(), left)); err != nil {
			return nil, err
		}
		warnings = append(warnings, fmt.Sprintf("the bundle is a partial build by %s (reason: %s), audited; left out: %s", p.GetBuiltBy(), p.GetReason(), left))
	}

	keys, err := s.regionKeysFor(ctx, b, held)
	if err != nil {
		return nil, err
	}
	now := s.cfg.Now()
	next, err := keystore.Build(b, keys, curStore, now)
	if err != nil {
		return nil, err
	}
	quotas, err := newQuotaSet(b, *s.cfg.DefaultQuota)
	if err != nil {
		return nil, err
	}
	// The Safety Condition, with this server's evidence: the served store's
	// usage and TTL history, and the history of versions and keysets it does
	// not hold (all of the persisted history while nothing is served).
	// Never forceable.
	if err := keystore.Check(s.cfg.Region, curStore, s.carried, next, now); err != nil {
		return nil, err
	}
	resp := &kmsv1.ApplyBundleResponse{Applied: ref, Previous: floor, Warnings: warnings}
	if req.GetDryRun() {
		return resp, nil
	}
	if err := writeBundleFile(s.cfg.StateDir, BundleFile, sb); err != nil {
		if !errors.Is(err, errNotDurable) {
			return nil, fmt.Errorf("%w: %v", errPersist, err)
		}
		// The new file is in place; serving it keeps memory and disk in step.
		s.log.Warn("kms: the applied bundle may not survive a crash", "err", err)
	}
	previous := s.keepPrevious(cur, servedFile)
	s.floor = ref
	s.served = newPersistedBundle(ref, sb)
	s.previous = previous
	s.carried = restoreHistory(next, s.carried, curStore, now)
	s.swap(&snapshot{store: next, ref: ref, appliedAt: s.cfg.Now(), createdAt: createdAt(b), notAfter: notAfter(b), regionKeys: keys, quotas: quotas})
	s.log.Info("kms: bundle applied", "serial", ref.GetSerial(), "sha256", fmt.Sprintf("%x", ref.GetSha256()),
		"keysets", next.Len(), "previous_serial", floor.GetSerial(),
		"shrink_override", b.GetShrinkOverride().GetReason(), "partial", b.GetPartial().GetReason())
	return resp, nil
}

// forceGone is the refusal of a request that sets force or force_reason.
// Since the shrink guard came to the KMS, its override is part of the
// signed bundle, so that every server of every region sees, and audits, the
// same override with the same reason; a per-request force would let one
// caller bypass the guard on one server unsigned. The request's fields stay
// on the wire, refused, so an old regionctl is told rather than ignored.
const forceGone = "force in the request is no longer accepted: a shrink override is signed into the bundle " +
	"(regionctl bundle build --force-shrink --reason TEXT) and audited by every server that applies it; " +
	"signature, region, serial and the Safety Condition are never overridden"

// servedBundle returns the bundle the shrink guard compares with and its
// size: the one served, or while nothing is served the persisted one waiting
// to load (nil, 0 if none). The one served is read from BundleFile and
// checked against s.served; file is the bytes of that file (nil while
// nothing is served), which the apply keeps as PreviousBundleFile. A file
// that does not hold the served bundle refuses the apply: the guard cannot
// run without it. Callers hold applyMu.
func (s *Server) servedBundle(cur *snapshot) (b *bundlev1.Bundle, size int, file []byte, err error) {
	if cur == nil {
		if p := s.floorBundle; p != nil && proto.Equal(p.file.ref, s.floor) {
			return p.bundle, p.file.size, nil, nil
		}
		return nil, 0, nil, nil
	}
	sb, data, err := s.readServed()
	if err != nil {
		return nil, 0, nil, fmt.Errorf("%w; the shrink guard compares every new bundle with the served one, so none is applied until then", err)
	}
	// Verified when applied; decoded here rather than kept decoded, which
	// would hold every keyset's ciphertext twice.
	var dec bundlev1.Bundle
	if err := (proto.UnmarshalOptions{DiscardUnknown: true}).Unmarshal(sb.GetBundle(), &dec); err != nil {
		return nil, 0, nil, fmt.Errorf("kms: decoding the served bundle for the shrink guard: %w", err)
	}
	return &dec, len(sb.GetBundle()), data, nil
}

// readServed reads the signed bundle served from BundleFile, checked against
// s.served, and returns it and the file's bytes. The error says what to do.
// Callers hold applyMu and serve a bundle.
func (s *Server) readServed() (*bundlev1.SignedBundle, []byte, error) {
	if s.served == nil {
		return nil, nil, fmt.Errorf("%w: the server serves bundle serial %d but holds no record of its file; restart it", errStateFile, s.cur.Load().ref.GetSerial())
	}
	sb, data, err := readHeldBundle(s.cfg.StateDir, BundleFile, s.served)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v; the server goes on serving that bundle from memory, but could not boot from this state directory "+
			"and cannot return it or check a new bundle against it: push bundle %s again (regionctl bundle push of its signed file; "+
			"an ApplyBundle of the bundle served rewrites the file)", errStateFile, err, s.served)
	}
	return sb, data, nil
}

// readPrevious reads the signed bundle served before from
// PreviousBundleFile, checked against s.previous (nil, nil if none). The
// error says what to do. Callers hold applyMu.
func (s *Server) readPrevious() (*bundlev1.SignedBundle, error) {
	if s.previous == nil {
		return nil, nil
	}
	sb, _, err := readHeldBundle(s.cfg.StateDir, PreviousBundleFile, s.previous)
	if err != nil {
		return nil, fmt.Errorf("%w: %v; serving is not affected, but a rollback to it needs its signed file from elsewhere; "+
			"to clear this, push the bundle served (%s) again, and the server drops the previous bundle, or apply a new one", errStateFile, err, s.served)
	}
	return sb, nil
}

// keepPrevious keeps the bundle served until now (whose file's bytes
// servedFile are, read before BundleFile was replaced; nil while nothing is
// served) as PreviousBundleFile for a rollback, and returns what to hold of
// the previous bundle. Losing it only loses that convenience (the bundle can
// still be given to regionctl): it is logged, and the stale file (a bundle
// older than the one served before) is removed, so that neither GetStatus
// nor a restart offers it. Callers hold applyMu.
func (s *Server) keepPrevious(cur *snapshot, servedFile []byte) *persistedBundle {
	if cur == nil {
		return s.previous // nothing served: the one served before stays the previous one
	}
	err := writeBundleData(s.cfg.StateDir, PreviousBundleFile, servedFile)
	if err == nil || errors.Is(err, errNotDurable) {
		return s.served
	}
	s.log.Warn("kms: the previous bundle could not be kept for a rollback", "serial", cur.ref.GetSerial(), "err", err)
	s.dropPrevious()
	return nil
}

// dropPrevious removes PreviousBundleFile (best effort: logged), which holds
// no previous bundle the server vouches for. Callers hold applyMu.
func (s *Server) dropPrevious() {
	path := filepath.Join(s.cfg.StateDir, PreviousBundleFile)
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		s.log.Warn("kms: cannot remove the stale previous bundle; a restart may offer it for a rollback", "file", path, "err", err)
	}
}

// repairBundleFiles runs on an apply of the bundle served: if BundleFile
// does not hold it, it is written again from sb (the bundle served, signed);
// if PreviousBundleFile does not hold the previous bundle, the server drops
// it. So pushing the served bundle again is the cure GetStatus names for
// either. An error (the file cannot be rewritten) refuses the apply; what is
// served does not change. Callers hold applyMu.
func (s *Server) repairBundleFiles(sb *bundlev1.SignedBundle, ref *bundlev1.BundleRef) error {
	if _, _, bad := s.readServed(); bad != nil {
		err := writeBundleFile(s.cfg.StateDir, BundleFile, sb)
		if err != nil && !errors.Is(err, errNotDurable) {
			return fmt.Errorf("%w: rewriting %s, which does not hold the bundle served: %v", errPersist, filepath.Join(s.cfg.StateDir, BundleFile), err)
		}
		s.served = newPersistedBundle(ref, sb)
		s.log.Warn("kms: rewrote the bundle file, which did not hold the bundle served", "serial", ref.GetSerial(), "was", bad, "write_err", err)
	}
	if _, err := s.readPrevious(); err != nil {
		s.log.Warn("kms: dropping the previous bundle, whose file does not hold it", "serial", s.previous.ref.GetSerial(), "err", err)
		s.previous = nil
		s.dropPrevious()
	}
	return nil
}

// auditOverride records an apply under a signed override (a shrink override
// or a partial build) and its reason before anything else is done (fail
// closed: no record, no apply).
func (s *Server) auditOverride(ctx context.Context, ref *bundlev1.BundleRef, dryRun bool, reason string) error {
	if dryRun {
		reason = "dry run: " + reason
	}
	caller, _ := identity.FromContext(ctx)
	rec := audit.Record{
		RequestID: audit.RequestID(ctx), Identity: caller.String(), Operation: adminService + "ApplyBundle",
		Target:  audit.Target{Region: s.cfg.Region, Resource: fmt.Sprintf("bundle serial %d sha256 %x", ref.GetSerial(), ref.GetSha256())},
		Outcome: audit.OutcomeAttempt, Reason: reason,
	}
	if err := s.cfg.Audit.Write(context.WithoutCancel(ctx), rec); err != nil {
		return fmt.Errorf("%w: cannot record the apply under a signed override: %v", errAudit, err)
	}
	return nil
}

// regionKeysFor returns the region key versions b's keysets need, and only
// those (GetStatus reports them as what the served bundle needs): those
// held, plus a fetch from RegionKeys if any is missing. held is not changed.
func (s *Server) regionKeysFor(ctx context.Context, b *bundlev1.Bundle, held map[uint32]tink.AEAD) (map[uint32]tink.AEAD, error) {
	missing := func(have map[uint32]tink.AEAD) []uint32 {
		var out []uint32
		for _, k := range b.GetKeysets() {
			v := k.GetKeyset().GetRegionKeyVersion()
			if _, ok := have[v]; !ok && !slices.Contains(out, v) {
				out = append(out, v)
			}
		}
		return out
	}
	if len(missing(held)) == 0 {
		return neededKeys(b, held), nil
	}
	fctx, cancel := context.WithTimeout(ctx, s.cfg.FetchTimeout)
	defer cancel()
	fetched, err := s.cfg.RegionKeys.Fetch(fctx, s.cfg.Region)
	if err != nil {
		return nil, fmt.Errorf("%w: fetching the keys of region %s: %v", errRegionKeys, s.cfg.Region, err)
	}
	keys := maps.Clone(held)
	if keys == nil {
		keys = make(map[uint32]tink.AEAD, len(fetched))
	}
	maps.Copy(keys, fetched)
	if m := missing(keys); len(m) > 0 {
		slices.Sort(m)
		return nil, fmt.Errorf("%w: region %s key versions %v are not available", errRegionKeys, s.cfg.Region, m)
	}
	return neededKeys(b, keys), nil
}

// neededKeys returns the versions of keys that b's keysets are encrypted
// under: a region key version the root KMS still serves but the bundle does
// not need must not be reported as needed, or it could never retire.
func neededKeys(b *bundlev1.Bundle, keys map[uint32]tink.AEAD) map[uint32]tink.AEAD {
	out := make(map[uint32]tink.AEAD, len(keys))
	for _, k := range b.GetKeysets() {
		v := k.GetKeyset().GetRegionKeyVersion()
		if a, ok := keys[v]; ok {
			out[v] = a
		}
	}
	return out
}

// GetStatus implements kms.v1.KMSAdmin.
func (a *adminAPI) GetStatus(ctx context.Context, req *kmsv1.GetStatusRequest) (resp *kmsv1.GetStatusResponse, err error) {
	s := a.s
	defer s.observe(opGetStatus, time.Now(), &err)
	out := &kmsv1.GetStatusResponse{Region: s.cfg.Region, Stats: s.metrics.requestStats()}
	cur := s.cur.Load()
	if cur == nil {
		out.State, out.NotReadyReason = s.State()
		s.applyMu.Lock()
		out.PendingBundle = s.floor
		s.applyMu.Unlock()
		if cur = s.cur.Load(); cur == nil { // it may have loaded meanwhile
			return out, nil
		}
		out.PendingBundle = nil
	}
	if req.GetIncludeBundle() {
		// The files hold what s.served and s.previous name only under
		// applyMu (an apply replaces them, then swaps), and cur must be
		// the one they name.
		s.applyMu.Lock()
		cur = s.cur.Load()
		out.ServedBundle, out.PreviousBundle, err = s.readBundles()
		s.applyMu.Unlock()
		if err != nil {
			return nil, toStatus(err)
		}
	}
	out.State = kmsv1.ServingState_SERVING_STATE_SERVING
	out.Bundle = cur.ref
	out.BundleAppliedAt = timestamppb.New(cur.appliedAt)
	out.KeysetCount = uint32(cur.store.Len())
	out.RegionKeyVersions = slices.Sorted(maps.Keys(cur.regionKeys))
	if !cur.notAfter.IsZero() {
		out.BundleNotAfter = timestamppb.New(cur.notAfter)
		out.BundleExpired = s.cfg.Now().After(cur.notAfter)
	}
	if req.GetIncludeKeysets() {
		for _, k := range cur.store.Keysets() {
			u := &kmsv1.KeysetUsage{Keyset: k.Name(), PrimaryKeyId: k.Primary().KeyID()}
			for _, v := range k.Versions() {
				use := v.Usage()
				vu := &kmsv1.KeyVersionUsage{KeyId: v.KeyID(), Status: v.Status(), EncryptCount: use.Encrypts, DecryptCount: use.Decrypts,
					HistoryLost: use.HistoryLost}
				if !use.LastUse.IsZero() {
					vu.LastUsed = timestamppb.New(use.LastUse)
				}
				if !use.LastEncrypt.IsZero() {
					vu.LastEncrypt = timestamppb.New(use.LastEncrypt)
				}
				u.Versions = append(u.Versions, vu)
			}
			out.Keysets = append(out.Keysets, u)
		}
	}
	return out, nil
}

// readBundles reads the signed bundles served and served before from the
// state directory, each checked against what the server holds of it.
// Callers hold applyMu and serve a bundle.
func (s *Server) readBundles() (served, previous *bundlev1.SignedBundle, err error) {
	if served, _, err = s.readServed(); err != nil {
		return nil, nil, err
	}
	if previous, err = s.readPrevious(); err != nil {
		return nil, nil, err
	}
	return served, previous, nil
}

// tooManyProbes is the refusal of a Probe of n probes, more than the limit
// (the batch limit). The codec gives it before decoding the request (see
// dataRequest); the handler checks again.
func tooManyProbes(n, limit int) error {
	return toStatus(fmt.Errorf("%w: %d probes, more than the limit of %d", errInvalid, n, limit))
}

// Probe implements kms.v1.KMSAdmin. Probes do not count as uses of a key
// version (they would keep a version looking used forever).
func (a *adminAPI) Probe(ctx context.Context, req *kmsv1.ProbeRequest) (resp *kmsv1.ProbeResponse, err error) {
	s := a.s
	defer s.observe(opProbe, time.Now(), &err)
	cur := s.cur.Load()
	if cur == nil {
		_, reason := s.State()
		return nil, toStatus(fmt.Errorf("%w: %s", errNotReady, reason))
	}
	audit.AddTarget(ctx, audit.Target{Region: s.cfg.Region})
	if n := len(req.GetProbes()); n > s.cfg.MaxBatch {
		return nil, tooManyProbes(n, s.cfg.MaxBatch)
	}
	// A probe that is not a golden probe is refused (not decrypted) and
	// fails with the reason, as a batch item does; every probe is audited.
	caller, _ := identity.FromContext(ctx)
	out := &kmsv1.ProbeResponse{Results: make([]*kmsv1.ProbeResult, len(req.GetProbes()))}
	for i, p := range req.GetProbes() {
		refused := s.mayProbe(cur.store, caller, p)
		if refused != nil {
			id, _ := keystore.KeyIDOf(p.GetCiphertext())
			out.Results[i] = &kmsv1.ProbeResult{KeyId: id, Detail: "refused, not decrypted: " + refused.Error()}
		} else {
			out.Results[i] = probe(cur.store, p)
		}
		if err := s.auditProbe(ctx, cur.store, caller, p, out.Results[i], refused); err != nil {
			return nil, toStatus(err)
		}
	}
	if ps := req.GetProbes(); len(ps) == 1 {
		if k, ok := cur.store.Keyset(ps[0].GetKeyset()); ok {
			audit.AddTarget(ctx, audit.Target{Keyset: k.Name(), KeyVersion: out.Results[0].GetKeyId()})
		}
	}
	return out, nil
}

// goldenADPrefix starts the associated data of every golden ciphertext the
// root KMS makes (rootkms/golden.go): "cairn/golden/v1\x00" || keyset ||
// "\x00" || be32(key ID). The data plane refuses to encrypt under it, so
// only the root KMS, which holds the keys, makes ciphertexts with it.
const goldenADPrefix = "cairn/golden/v1\x00"

// isGolden reports whether ad is the golden associated data of version
// keyID of keyset name.
func isGolden(ad []byte, name string, keyID uint32) bool {
	rest, ok := bytes.CutPrefix(ad, []byte(goldenADPrefix))
	if !ok || len(rest) != len(name)+5 || string(rest[:len(name)]) != name || rest[len(name)] != 0 {
		return false
	}
	return binary.BigEndian.Uint32(rest[len(name)+1:]) == keyID
}

// checkReservedAD refuses associated data in the golden ciphertexts'
// reserved form on the encrypting data-plane calls.
func checkReservedAD(ad []byte) error {
	if bytes.HasPrefix(ad, []byte(goldenADPrefix)) {
		return fmt.Errorf("%w: associated data beginning %q is reserved for the root KMS's golden ciphertexts", errInvalid, goldenADPrefix)
	}
	return nil
}

// mayProbe refuses a probe that is not a golden probe, unless caller may
// decrypt with the keyset anyway. A golden probe's associated data is the
// golden form for its keyset and the key ID its ciphertext names: since the
// data plane never encrypts with that form, it decrypts only the root KMS's
// golden ciphertexts, whose plaintexts are random and thrown away. So Probe
// tells an admin whether a server serves a version, and nothing about any
// customer's ciphertext: it is no decrypt oracle.
func (s *Server) mayProbe(store *keystore.Store, caller identity.ID, p *kmsv1.GoldenProbe) error {
	if id, ok := keystore.KeyIDOf(p.GetCiphertext()); ok && isGolden(p.GetAssociatedData(), p.GetKeyset(), id) {
		return nil
	}
	if k, ok := store.Keyset(p.GetKeyset()); ok && k.Allows(keystore.OpDecrypt, caller) {
		return nil
	}
	return fmt.Errorf("%w: not a golden probe (associated data %q || keyset || 0 || be32(key ID of the ciphertext)), and %s may not decrypt with keyset %q",
		errDenied, goldenADPrefix, caller, truncate(p.GetKeyset()))
}

// auditProbe records one probe and its result, or its refusal (fail
// closed: no record, no answer).
func (s *Server) auditProbe(ctx context.Context, store *keystore.Store, caller identity.ID, p *kmsv1.GoldenProbe, res *kmsv1.ProbeResult, refused error) error {
	outcome, code, reason := audit.OutcomeOK, "", "golden probe: decrypted to the expected SHA-256"
	switch {
	case refused != nil:
		outcome, code, reason = audit.OutcomeDenied, codes.PermissionDenied.String(), "probe refused: "+refused.Error()
	case !res.GetOk():
		reason = "golden probe failed: " + res.GetDetail()
	}
	target := audit.Target{Region: s.cfg.Region, KeyVersion: res.GetKeyId()}
	if k, ok := store.Keyset(p.GetKeyset()); ok {
		target.Keyset = k.Name() // a name the caller sent is recorded only if served (it may hold anything)
	}
	rec := audit.Record{
		RequestID: audit.RequestID(ctx), Identity: caller.String(), Operation: adminService + "Probe",
		Target:  target,
		Outcome: outcome, Code: code, Reason: reason,
	}
	if err := s.cfg.Audit.Write(context.WithoutCancel(ctx), rec); err != nil {
		return fmt.Errorf("%w: cannot record a probe: %v", errAudit, err)
	}
	return nil
}

func probe(store *keystore.Store, p *kmsv1.GoldenProbe) *kmsv1.ProbeResult {
	k, ok := store.Keyset(p.GetKeyset())
	if !ok {
		return &kmsv1.ProbeResult{Detail: fmt.Sprintf("no keyset %q", truncate(p.GetKeyset()))}
	}
	res := &kmsv1.ProbeResult{}
	pt, v, err := k.ProbeDecrypt(p.GetCiphertext(), p.GetAssociatedData())
	if v != nil {
		res.KeyId = v.KeyID()
	}
	if err != nil {
		res.Detail = "did not decrypt"
		return res
	}
	sum := sha256.Sum256(pt)
	clear(pt)
	if subtle.ConstantTimeCompare(sum[:], p.GetPlaintextSha256()) != 1 {
		res.Detail = "decrypted, but the plaintext's SHA-256 does not match plaintext_sha256"
		return res
	}
	res.Ok = true
	return res
}
