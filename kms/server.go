// Package kms is the regional KMS: the server storage systems call to wrap
// and unwrap their data keys (kms.v1.KMS), and the admin API rollout tooling
// uses to apply config bundles (kms.v1.KMSAdmin).
//
// The server holds its region's customer keysets decrypted in RAM, in one
// immutable keystore.Store behind an atomic pointer. It loads them from a
// signed config bundle (persisted in the state directory, so a restart needs
// no push) and the region master key versions (RegionKeys: the root KMS,
// once per boot). Once serving, the request path touches only RAM: the root
// KMS, distributors and safes may all be down.
//
// ApplyBundle builds a new Store off to the side and swaps it in only after
// every check passed and the signed bundle is on disk; a refused bundle
// changes nothing.
//
// # Hostile load
//
// Before a data-plane call's request is even read, the server admits it or
// sheds it with RESOURCE_EXHAUSTED and a google.rpc.RetryInfo (the delay is
// in the message too): the caller's quota (the bundle's first quota whose
// SPIFFE ID pattern matches, else its default_quota, else
// Config.DefaultQuota; a token bucket for the rate and a cap on calls in
// progress), then the server's cap on calls in progress over all callers
// (Config.MaxInFlight). Refusals are not audited call by call: each
// caller's are counted and audited once per Config.QuotaAuditWindow. A
// data-plane request over Config.MaxDataMsgSize (4 MiB), or a batch over
// Config.MaxBatch items, is refused before it is decoded; only ApplyBundle
// takes requests up to Config.MaxRecvMsgSize (bundles). The transit API
// goes through the same admission.
//
// # What a caller learns
//
// A caller on none of a keyset's ACLs cannot tell whether the keyset
// exists: every data-plane method (batches and the transit API included)
// refuses it with PERMISSION_DENIED and the same message, byte for byte,
// for an unknown keyset ("caller X may not use keyset Y in region R, or it
// does not exist"), and the transit key read answers both with the same
// 404. A caller on one of the keyset's ACLs is told which operation it
// lacks, and, when it may decrypt, that a ciphertext names a key version
// the keyset does not hold enabled (NOT_FOUND naming the version: the key
// ID is in the clear in the ciphertext, so this is no oracle, and it is
// what an operator debugging a destroyed version needs). Any other
// ciphertext that does not decrypt gets one fixed message: no decrypt
// oracle.
// KMSAdmin.Probe decrypts only golden ciphertexts (the associated data the
// root KMS gives them, which the data plane refuses to encrypt under),
// unless the admin is on the keyset's decrypt ACL, and audits every probe
// with its keyset and key version.
package kms

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tink-crypto/tink-go/v2/tink"
	"google.golang.org/grpc"

	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/internal/grpcserver"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/safety"
	"github.com/cairnkms/cairn/kms/keystore"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// Full method names, for the access policy and the audit options.
const (
	kmsService   = "/cairn.kms.v1.KMS/"
	adminService = "/cairn.kms.v1.KMSAdmin/"
)

// snapshot is everything the server serves, swapped as one: the keystore,
// the ref of the bundle it was built from (the signed bundle is in
// BundleFile only: see Server.served), and the region key versions it
// holds. Immutable.
type snapshot struct {
	store      *keystore.Store
	ref        *bundlev1.BundleRef
	appliedAt  time.Time
	createdAt  time.Time // the bundle's created_at
	notAfter   time.Time // the bundle's not_after (zero: none, format 1)
	regionKeys map[uint32]tink.AEAD
	// keysetMetrics holds the counters of the keysets with a series of
	// their own (set by swap).
	keysetMetrics *keysetTable
	// quotas are the bundle's per-caller quotas.
	quotas *quotaSet
}

// pending is a verified bundle read from the state directory at Start that
// is not served yet (its region keys are still being fetched): decoded, and
// what the server keeps of its file once it serves it.
type pending struct {
	bundle *bundlev1.Bundle
	file   *persistedBundle
}

// Server is a regional KMS server: New, Start, then Close.
type Server struct {
	cfg     Config
	log     *slog.Logger
	grpc    *grpc.Server
	metrics *metrics
	policy  identity.Policy // the gRPC API's access policy
	adm     *admission      // the data plane's quotas and load shedding

	cur atomic.Pointer[snapshot] // nil until the first bundle is loaded

	// trust is the pinned signing keys and admin allowlist in force
	// (SetTrust swaps it; trustMu serialises the swaps).
	trust   atomic.Pointer[trust]
	trustMu sync.Mutex

	// phase and reason say why cur is nil (see GetStatus).
	phase  atomic.Int32 // kmsv1.ServingState
	reason atomic.Pointer[string]

	// applyMu serialises every change of cur (ApplyBundle and boot) and
	// guards floor. The request path never takes it.
	applyMu sync.Mutex
	// floor is the bundle a new one must be newer than while nothing is
	// served: the verified persisted bundle, if any.
	floor *bundlev1.BundleRef
	// recordFloor is the region's bundle serial floor from the record
	// (Config.SerialFloor), once recordFloorKnown: see checkRecordFloor.
	recordFloor      uint64
	recordFloorKnown bool
	// served is what the server keeps of the signed bundle it serves (nil
	// while nothing is served): the bundle itself is in BundleFile, read
	// back (and checked against served) by GetStatus's include_bundle, the
	// shrink guard and the apply that keeps it as the previous one. Kept in
	// RAM, every signed bundle would cost hundreds of bytes per keyset.
	served *persistedBundle
	// previous is what the server keeps of the signed bundle served before
	// the current one (nil if none); the bundle is in PreviousBundleFile,
	// kept so that a rollback can restore it.
	previous *persistedBundle
	// floorBundle is the persisted bundle floor names while nothing is
	// served: the shrink guard's comparison until it is loaded.
	floorBundle *pending
	// carried is the usage history of key versions the served store does
	// not hold (all of the history read at start, while nothing is served),
	// still within their TTL, and the TTL histories of keysets it does not
	// hold whose ciphertexts may still be live: the Safety check counts
	// them, and they are flushed with the served store's until they are
	// over.
	carried keystore.History

	// swapped nudges the usage flush loop after a swap (capacity 1).
	swapped chan struct{}

	// refusalMu serialises auditRefusals; refusalsFrom is the start of the
	// window it audits next.
	refusalMu    sync.Mutex
	refusalsFrom time.Time

	startOnce sync.Once
	closeOnce sync.Once
	ctx       context.Context // canceled by Close
	cancel    context.CancelFunc
	wg        sync.WaitGroup
}

// New checks the configuration and prepares a server; it serves nothing
// until Start.
func New(cfg Config) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	m, err := newMetrics(cfg.Registry, cfg.MetricsKeysetLimit)
	if err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, log: cfg.Logger.With("region", cfg.Region), metrics: m, swapped: make(chan struct{}, 1), refusalsFrom: time.Now()}
	s.adm = newAdmission(cfg.MaxInFlight, *cfg.DefaultQuota, &m.shed)
	if err := m.inFlight(func() float64 { return float64(s.adm.inflight.Load()) }); err != nil {
		return nil, fmt.Errorf("kms: registering metrics: %w", err)
	}
	s.trust.Store(&trust{keys: slices.Clone(cfg.SigningKeys), admins: cfg.Admins})
	if err := s.registerExpiryMetrics(); err != nil {
		return nil, err
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.setNotReady(kmsv1.ServingState_SERVING_STATE_STARTING, "not started")

	member := identity.AllowAny() // the trust domain is enforced by mTLS; keyset ACLs by the handlers
	policy := identity.Policy{
		kmsService + "Encrypt":         member,
		kmsService + "Decrypt":         member,
		kmsService + "EncryptBatch":    member,
		kmsService + "DecryptBatch":    member,
		kmsService + "GenerateDataKey": member,
		kmsService + "Rewrap":          member,
		adminService + "ApplyBundle":   s.authorizeAdmin, // the allowlist in force (SetTrust)
		adminService + "GetStatus":     s.authorizeAdmin,
		adminService + "Probe":         s.authorizeAdmin,
	}
	s.policy = policy // Transit authorizes with it too
	s.grpc, err = grpcserver.New(grpcserver.Options{
		Source: cfg.Source, Policy: policy, Audit: cfg.Audit,
		Ready: s.Readiness, Reflection: cfg.Reflection,
		Mutating:        []string{adminService + "ApplyBundle"},
		Unaudited:       []string{adminService + "GetStatus"},
		MaxRecvMsgSize:  cfg.MaxRecvMsgSize,
		MaxCallDuration: cfg.MaxCallDuration,
		Registerer:      m.reg,
		// A worker per call the server admits at once (MaxInFlight), up to
		// maxStreamWorkers: the data plane's calls then run on stacks
		// already grown.
		StreamWorkers: min(cfg.MaxInFlight, maxStreamWorkers),
		// Batches decode into one slice and encode into one buffer; a
		// data-plane request over the data plane's limits is refused
		// before it is decoded.
		Codec: newBatchCodec(cfg.MaxDataMsgSize, cfg.MaxBatch),
	})
	if err != nil {
		return nil, err
	}
	api := &kmsAPI{s: s}
	desc, err := s.kmsDesc(api)
	if err != nil {
		return nil, err
	}
	s.grpc.RegisterService(desc, api)
	admin := &adminAPI{s: s}
	ad, err := adminDesc(admin)
	if err != nil {
		return nil, err
	}
	s.grpc.RegisterService(ad, admin)
	return s, nil
}

// maxStreamWorkers bounds the server's stream workers: each idle one keeps
// the stack its calls grew (tens of KiB), so a very large MaxInFlight must
// not become as many parked goroutines. Calls beyond the workers get a
// goroutine of their own, as without workers.
const maxStreamWorkers = 256

// Start serves on lis and loads the persisted bundle in the background:
// region keys are fetched with jittered backoff until they arrive or Close.
// GetStatus answers at once; the data plane answers UNAVAILABLE until the
// bundle is loaded.
func (s *Server) Start(lis net.Listener) error {
	err := errors.New("kms: already started")
	s.startOnce.Do(func() { err = s.start(lis) })
	return err
}

func (s *Server) start(lis net.Listener) error {
	if err := os.MkdirAll(s.cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("kms: state directory: %w", err)
	}
	p, err := s.readPersisted()
	s.applyMu.Lock()
	s.carried = s.readHistory(p)
	s.applyMu.Unlock()
	switch {
	case err != nil:
		// Not trusted, so it sets no floor: an admin must push a bundle.
		s.log.Error("kms: the persisted bundle is unusable; waiting for ApplyBundle", "err", err)
		s.setNotReady(kmsv1.ServingState_SERVING_STATE_NOT_READY, fmt.Sprintf("the persisted bundle is unusable (%v); waiting for ApplyBundle", err))
	case p == nil:
		s.setNotReady(kmsv1.ServingState_SERVING_STATE_NOT_READY, "no bundle applied yet; waiting for ApplyBundle")
	default:
		s.applyMu.Lock()
		s.floor, s.floorBundle = p.file.ref, p
		s.applyMu.Unlock()
		s.setNotReady(kmsv1.ServingState_SERVING_STATE_STARTING, fmt.Sprintf("fetching region keys for bundle serial %d", p.file.ref.GetSerial()))
		s.wg.Go(func() { s.bootLoop(p) })
	}
	s.wg.Go(func() {
		if err := s.grpc.Serve(lis); err != nil {
			s.log.Error("kms: serving stopped", "err", err)
		}
	})
	s.wg.Go(s.flushUsageLoop)
	s.wg.Go(s.auditRefusalsLoop)
	s.log.Info("kms: started", "addr", lis.Addr().String(), "identity", s.cfg.Source.ID().String())
	return nil
}

// readHistory returns the usage and TTL history to start from. A server that
// has served a bundle but cannot read its history (the file damaged, or gone)
// fails closed: it assumes every version the bundle lists as decrypting was
// used and encrypted with just now (marked HistoryLost), so none leaves the
// decrypt set before its TTL has passed.
// An unusable file is set aside, not overwritten. A state dir with neither
// bundle nor history is a first start: no history.
func (s *Server) readHistory(p *pending) keystore.History {
	now := s.cfg.Now()
	h, err := readUsageFile(s.cfg.StateDir, now)
	switch {
	case err == nil:
		return h
	case errors.Is(err, errNoUsageFile) && p == nil:
		return keystore.History{}
	case errors.Is(err, errNoUsageFile):
		s.log.Error("kms: a bundle was served but there is no usage history; assuming every decrypting version was used now", "file", UsageFile)
	default:
		aside, rerr := setAsideUsageFile(s.cfg.StateDir, now)
		s.log.Error("kms: the usage history is unusable; set aside, and assuming every decrypting version of the persisted bundle was used now",
			"err", err, "set_aside_as", aside, "rename_err", rerr)
	}
	s.metrics.historyLost.Set(1)
	if p == nil {
		return keystore.History{} // nothing is known to have been served
	}
	return keystore.History{Usage: usageFromBundle(p.bundle, now)}
}

// readPersisted reads and verifies the persisted bundle (nil if none). It
// keeps neither signed bundle: only what names and checks their files.
func (s *Server) readPersisted() (*pending, error) {
	sb, err := readBundleFile(s.cfg.StateDir, BundleFile)
	if err != nil || sb == nil {
		return nil, err
	}
	// The bundle served before, for a rollback: best effort, and only one
	// this server would accept.
	if prev, err := readBundleFile(s.cfg.StateDir, PreviousBundleFile); err == nil && prev != nil {
		if pb, err := bundle.Verify(prev, s.signingKeys()); err == nil && pb.GetRegion() == s.cfg.Region {
			s.previous = newPersistedBundle(bundle.Ref(prev, pb), prev)
		}
	}
	b, err := bundle.Verify(sb, s.signingKeys())
	if err != nil {
		return nil, err
	}
	if b.GetRegion() != s.cfg.Region {
		return nil, fmt.Errorf("%w: it is for region %q, this server serves %q", errWrongRegion, b.GetRegion(), s.cfg.Region)
	}
	return &pending{bundle: b, file: newPersistedBundle(bundle.Ref(sb, b), sb)}, nil
}

// bootLoop loads the persisted bundle, retrying with jittered backoff until
// it is served (by this loop or by an ApplyBundle) or the server closes.
func (s *Server) bootLoop(p *pending) {
	backoff := s.cfg.RetryMin
	for s.cur.Load() == nil {
		err := s.loadPending(p)
		if err == nil {
			return
		}
		s.setNotReady(kmsv1.ServingState_SERVING_STATE_NOT_READY, fmt.Sprintf("cannot load the persisted bundle (serial %d): %v; retrying", p.file.ref.GetSerial(), err))
		s.log.Warn("kms: loading the persisted bundle failed; retrying", "serial", p.file.ref.GetSerial(), "err", err, "backoff", backoff)
		if !s.sleep(jitter(backoff)) {
			return
		}
		backoff = min(2*backoff, s.cfg.RetryMax)
	}
}

func (s *Server) loadPending(p *pending) error {
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.FetchTimeout)
	defer cancel()
	keys, err := s.cfg.RegionKeys.Fetch(ctx, s.cfg.Region)
	if err != nil {
		return fmt.Errorf("%w: fetching the keys of region %s: %v", errRegionKeys, s.cfg.Region, err)
	}
	s.applyMu.Lock()
	defer s.applyMu.Unlock()
	if s.cur.Load() != nil {
		return nil // an ApplyBundle won the race
	}
	now := s.cfg.Now()
	store, err := keystore.Build(p.bundle, keys, nil, now)
	if err != nil {
		return err
	}
	quotas, err := newQuotaSet(p.bundle, *s.cfg.DefaultQuota)
	if err != nil {
		return err
	}
	s.carried = restoreHistory(store, s.carried, nil, now)
	if len(s.carried.Usage) > 0 {
		s.log.Warn("kms: the usage history names key versions the persisted bundle lacks; the Safety check keeps counting them until their TTL passes",
			"versions", len(s.carried.Usage))
	}
	// Nothing replaced BundleFile since it was read: only an apply does,
	// and an apply swaps (under applyMu) before anything else may.
	s.served = p.file
	s.swap(&snapshot{store: store, ref: p.file.ref, appliedAt: s.cfg.Now(), createdAt: createdAt(p.bundle), notAfter: notAfter(p.bundle), regionKeys: neededKeys(p.bundle, keys), quotas: quotas})
	s.log.Info("kms: serving the persisted bundle", "serial", p.file.ref.GetSerial(), "keysets", store.Len())
	return nil
}

// createdAt is b's created_at (the zero time if unset).
func createdAt(b *bundlev1.Bundle) time.Time {
	if b.GetCreatedAt() == nil {
		return time.Time{}
	}
	return b.GetCreatedAt().AsTime()
}

// notAfter is b's not_after (the zero time if it has none).
func notAfter(b *bundlev1.Bundle) time.Time {
	t, _ := bundle.NotAfter(b)
	return t
}

// swap serves next. Callers hold applyMu.
func (s *Server) swap(next *snapshot) {
	var prev *keysetTable
	if cur := s.cur.Load(); cur != nil {
		prev = cur.keysetMetrics
	}
	next.keysetMetrics = s.metrics.keysetTableFor(prev, next.store)
	if next.quotas != nil {
		s.adm.setQuotas(next.quotas)
	}
	s.cur.Store(next)
	// Something is served now, and the shrink guard compares with it: drop
	// the decoded persisted bundle (every keyset's config and ciphertext).
	s.floorBundle = nil
	select {
	case s.swapped <- struct{}{}: // the flush loop writes the history
	default: // a flush is due already
	}
	s.phase.Store(int32(kmsv1.ServingState_SERVING_STATE_SERVING))
	s.reason.Store(new(string))
	s.metrics.served(next)
}

// setNotReady records why nothing is served yet. It takes applyMu, so it
// cannot overwrite the state of a swap that just happened.
func (s *Server) setNotReady(phase kmsv1.ServingState, reason string) {
	s.applyMu.Lock()
	defer s.applyMu.Unlock()
	if s.cur.Load() != nil {
		return
	}
	s.reason.Store(&reason)
	s.phase.Store(int32(phase))
	s.metrics.ready(false)
}

// Ready reports whether the server serves a bundle.
func (s *Server) Ready() bool { return s.cur.Load() != nil }

// Readiness reports whether the server serves a bundle and, when not, why
// (for grpc.health.v1 and /readyz).
func (s *Server) Readiness() (bool, string) {
	if s.ctx.Err() != nil {
		return false, "shut down"
	}
	if err := s.cfg.Audit.Broken(); err != nil {
		return false, fmt.Sprintf("the audit log is broken (%v): every call is refused; restart the server once its audit sink works", err)
	}
	if s.Ready() {
		return true, ""
	}
	_, reason := s.State()
	return false, reason
}

// State returns the serving state and, unless serving, why not.
func (s *Server) State() (kmsv1.ServingState, string) {
	if s.cur.Load() != nil {
		return kmsv1.ServingState_SERVING_STATE_SERVING, ""
	}
	return kmsv1.ServingState(s.phase.Load()), *s.reason.Load()
}

// Close stops serving (letting calls in flight finish, for a few seconds at
// most) and stops the boot loop.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.cancel()
		done := make(chan struct{})
		go func() { s.grpc.GracefulStop(); close(done) }()
		t := time.NewTimer(closeGrace)
		select {
		case <-done:
		case <-t.C:
			s.grpc.Stop()
			<-done
		}
		t.Stop()
		s.wg.Wait()
		s.metrics.ready(false)
		s.auditRefusals()
		// The handlers have returned (grpcserver waits for them): the
		// history is complete.
		if err := s.flushUsage(); err != nil {
			s.log.Error("kms: writing the usage history at close", "err", err)
		}
	})
	return nil
}

// flushUsageLoop writes the usage history every UsageFlushInterval, and at
// once after each swap (so that a server killed before its first tick still
// leaves a history behind), until Close (which writes it once more).
func (s *Server) flushUsageLoop() {
	t := time.NewTicker(s.cfg.UsageFlushInterval)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		case <-s.swapped:
		}
		if err := s.flushUsage(); err != nil {
			s.log.Error("kms: writing the usage history", "err", err)
		}
	}
}

// flushUsage writes the usage history to UsageFile: the served store's and
// the carried records still within their TTL. With nothing served it leaves
// the file as it is.
func (s *Server) flushUsage() error {
	s.applyMu.Lock()
	cur := s.cur.Load()
	if cur == nil {
		s.applyMu.Unlock()
		return nil
	}
	now := s.cfg.Now()
	s.carried.Usage = live(s.carried.Usage, now)
	s.carried.TTL = liveTTL(s.carried.TTL, now)
	records := append(cur.store.UsageRecords(now), s.carried.Usage...)
	ttl := cur.store.TTLHistories()
	for name, h := range s.carried.TTL {
		if _, served := ttl[name]; !served {
			ttl[name] = h
		}
	}
	s.applyMu.Unlock()
	return writeUsageFile(s.cfg.StateDir, records, ttl)
}

// restoreHistory gives next, a store nobody serves yet, the carried history
// of its keysets and versions, and returns what is left to carry: the rest,
// plus the TTL histories of the keysets of prev (the store served until now,
// or nil) that next drops, closed at now; all without what is over at now.
func restoreHistory(next *keystore.Store, carried keystore.History, prev *keystore.Store, now time.Time) keystore.History {
	out := keystore.History{
		Usage: live(next.RestoreUsage(carried.Usage), now),
		TTL:   next.RestoreTTL(carried.TTL, now),
	}
	if prev != nil {
		for _, k := range prev.Keysets() {
			if _, kept := next.Keyset(k.Name()); !kept {
				if out.TTL == nil {
					out.TTL = map[string][]safety.TTLPeriod{}
				}
				out.TTL[k.Name()] = k.TTLHistory()
			}
		}
	}
	out.TTL = liveTTL(out.TTL, now)
	return out
}

// liveTTL closes (at now) the TTL histories of keysets not served and keeps
// those whose ciphertexts may still be live at now.
func liveTTL(histories map[string][]safety.TTLPeriod, now time.Time) map[string][]safety.TTLPeriod {
	var out map[string][]safety.TTLPeriod
	for name, h := range histories {
		if h = keystore.ClosedTTL(h, now); h != nil {
			if out == nil {
				out = map[string][]safety.TTLPeriod{}
			}
			out[name] = h
		}
	}
	return out
}

// live keeps the records that still matter to the Safety check at now.
func live(records []keystore.UsageRecord, now time.Time) []keystore.UsageRecord {
	var out []keystore.UsageRecord
	for _, r := range records {
		if r.Live(now) {
			out = append(out, r)
		}
	}
	return out
}

// closeGrace bounds how long Close waits for calls in flight.
const closeGrace = 5 * time.Second

// sleep waits d or until Close; it reports whether to go on.
func (s *Server) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-s.ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// jitter returns a duration uniformly in [d/2, d).
func jitter(d time.Duration) time.Duration {
	n, err := rand.Int(rand.Reader, big.NewInt(int64(d/2)+1))
	if err != nil {
		return d
	}
	return d/2 + time.Duration(n.Int64())
}
