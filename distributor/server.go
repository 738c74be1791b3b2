package distributor

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/grpcserver"
	"github.com/cairnkms/cairn/internal/hpkeseal"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/secret"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
)

const svc = "/cairn.distributor.v1.Distributor/"

// Server is a distributor. Make it with New, serve it with Serve, stop it
// with Close (which wipes the key).
type Server struct {
	distributorv1.UnimplementedDistributorServer

	cfg Config
	log *slog.Logger

	mu          sync.Mutex
	manifest    *safev1.GenesisManifest // pinned lineage; nil until provisioned
	key         *rootKey                // nil while sealed
	unsealedAt  time.Time
	unsealedBy  string
	ceremony    *ceremony // the current (or last) ceremony
	lastHandout *distributorv1.Handout
	peers       map[string]*distributorv1.PeerStatus
	changed     chan struct{} // closed and replaced whenever seal state changes
	// emergency: sealed by an emergency Seal. The peer loop fetches from no
	// peer and no peer's key is installed until an unseal ceremony succeeds.
	// Like the key it lives in RAM only: a restarted distributor forgets it
	// and fetches from its peers, which, emergency-sealed too, hand out
	// nothing.
	emergency bool

	metrics *metrics
	// auditHook, if set (tests only: export_test.go), writes the records
	// the server writes itself instead of cfg.Audit.
	auditHook func(context.Context, audit.Record) error

	grpc    *grpc.Server
	stop    chan struct{}
	wg      sync.WaitGroup
	closeMu sync.Once
}

// New makes a sealed distributor. It reads the pinned manifest if there is
// one; a malformed manifest is an error (never silently unprovisioned).
func New(cfg Config) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg.setDefaults()
	s := &Server{cfg: cfg, log: cfg.Logger, peers: map[string]*distributorv1.PeerStatus{}, changed: make(chan struct{}), stop: make(chan struct{})}
	m, err := safe.ReadManifest(cfg.ManifestPath)
	switch {
	case err == nil:
		s.manifest = m
		// A pinned manifest whose officers no ceremony can accept (written
		// before genesis checked them) still serves: this distributor starts
		// and takes the key from its peers. Only the ceremonies it breaks
		// are refused (reloadManifestLocked), saying why.
		if err := CheckManifest(m, cfg.Source.TrustDomain()); err != nil {
			s.log.Error("distributor: the pinned manifest binds a share to an officer no ceremony can accept; unseal and rekey ceremonies will be refused until the manifest is repaired", "path", cfg.ManifestPath, "err", err)
		}
	case errors.Is(err, os.ErrNotExist):
		s.log.Info("distributor: no genesis manifest yet; waiting for a provisioning ceremony", "path", cfg.ManifestPath)
	default:
		return nil, fmt.Errorf("distributor: the pinned manifest %s: %w", cfg.ManifestPath, err)
	}
	for _, a := range cfg.PeerAddrs {
		s.peers[a] = &distributorv1.PeerStatus{Address: a, State: distributorv1.SealState_SEAL_STATE_UNSPECIFIED}
	}
	if s.metrics, err = newMetrics(s, cfg.Registry); err != nil {
		return nil, err
	}
	policy := identity.Policy{
		svc + "GetStatus":        identity.AllowAny(),
		svc + "GetCeremony":      identity.AllowAny(),
		svc + "FetchRootKey":     s.metrics.countDenied(anyOf(cfg.RootKeyReaders, cfg.Peers)),
		svc + "OpenCeremony":     cfg.Officers.Authorize,
		svc + "SubmitShare":      cfg.Officers.Authorize,
		svc + "ProvisionRootKey": cfg.Officers.Authorize,
		svc + "CancelCeremony":   cfg.Officers.Authorize,
		svc + "Seal":             cfg.Officers.Authorize,
		svc + "InstallManifest":  cfg.Officers.Authorize,
	}
	s.grpc, err = grpcserver.New(grpcserver.Options{
		Source: cfg.Source, Policy: policy, Audit: cfg.Audit,
		Ready: s.Readiness, Reflection: cfg.Reflection,
		Mutating:   []string{svc + "OpenCeremony", svc + "SubmitShare", svc + "ProvisionRootKey", svc + "CancelCeremony", svc + "Seal", svc + "InstallManifest"},
		Unaudited:  []string{svc + "GetStatus", svc + "GetCeremony"},
		Registerer: s.metrics.reg,
	})
	if err != nil {
		return nil, err
	}
	distributorv1.RegisterDistributorServer(s.grpc, s)
	return s, nil
}

func anyOf(lists ...identity.Allowlist) identity.Authorizer {
	return func(id identity.ID) error {
		for _, l := range lists {
			if l.Allows(id) {
				return nil
			}
		}
		return fmt.Errorf("%w: %s may not fetch the root key", identity.ErrPermissionDenied, id)
	}
}

// Serve serves gRPC on lis and runs the peer loop until Close. It returns
// when the server stops.
func (s *Server) Serve(lis net.Listener) error {
	s.wg.Add(1)
	go func() { defer s.wg.Done(); s.peerLoop() }()
	return s.grpc.Serve(lis)
}

// Close stops serving, stops the peer loop and wipes the key.
func (s *Server) Close() {
	s.closeMu.Do(func() {
		close(s.stop)
		s.grpc.Stop()
		s.wg.Wait()
		s.mu.Lock()
		defer s.mu.Unlock()
		s.dropKeyLocked("shutdown")
		if s.ceremony != nil && s.ceremony.state == distributorv1.CeremonyState_CEREMONY_STATE_OPEN {
			s.ceremony.end(distributorv1.CeremonyState_CEREMONY_STATE_CANCELLED, "distributor shut down; shares wiped")
		}
	})
}

// Sealed reports whether the distributor holds no key.
func (s *Server) Sealed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.key == nil
}

// Readiness reports whether the distributor is ready: unsealed (it holds
// the root key). When not, the reason says what it waits for (a ceremony's
// progress, peers, provisioning). It is cheap: health checks poll it.
func (s *Server) Readiness() (ready bool, reason string) {
	st := s.state()
	c := st.ceremony
	if err := s.cfg.Audit.Broken(); err != nil && !st.closed {
		return false, fmt.Sprintf("the audit log is broken (%v): every call is refused; restart the server once its audit sink works", err)
	}
	switch {
	case st.closed:
		return false, "shut down"
	case st.ready:
		return true, ""
	case c != nil && c.kind == distributorv1.CeremonyKind_CEREMONY_KIND_UNSEAL:
		return false, fmt.Sprintf("sealed: unseal ceremony %s open, %d of %d shares received", c.id, c.received, c.required)
	case st.emergency:
		return false, "emergency-sealed: fetching from no peer; only an unseal ceremony (K officers) unseals it"
	case c != nil && c.kind == distributorv1.CeremonyKind_CEREMONY_KIND_REKEY:
		return false, fmt.Sprintf("sealed: rekey ceremony %s open, %d of %d shares received", c.id, c.received, c.required)
	case c != nil:
		return false, fmt.Sprintf("sealed: provisioning ceremony %s open, waiting for the root key from genesis", c.id)
	case !st.provisioned:
		return false, "sealed: not provisioned (no genesis manifest); run a provisioning ceremony"
	case st.peers > 0:
		return false, fmt.Sprintf("sealed: no ceremony open; fetching the root key from %d peer distributor(s) until one hands it out, or open an unseal ceremony", st.peers)
	}
	return false, "sealed: no ceremony open; open an unseal ceremony"
}

// serverState is a consistent view of the seal and ceremony state, for
// Readiness and the metrics.
type serverState struct {
	sealed, ready, closed, provisioned bool
	emergency                          bool
	peers                              int
	ceremony                           *ceremonyState // the open ceremony; nil if none
}

type ceremonyState struct {
	id                 string
	kind               distributorv1.CeremonyKind
	received, required int
}

func (s *Server) state() serverState {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := serverState{sealed: s.key == nil, provisioned: s.manifest != nil, peers: len(s.cfg.PeerAddrs), emergency: s.emergency}
	select {
	case <-s.stop:
		st.closed = true
	default:
	}
	st.ready = !st.sealed && !st.closed
	if c := s.ceremony; c != nil && c.checkOpen(s.cfg.Now()) == nil {
		st.ceremony = &ceremonyState{id: c.id, kind: c.kind, received: len(c.accepted), required: int(c.manifest.GetThreshold())}
	}
	return st
}

// WaitUnsealed blocks until the distributor holds the key or ctx ends.
func (s *Server) WaitUnsealed(ctx context.Context) error {
	for {
		s.mu.Lock()
		sealed, ch := s.key == nil, s.changed
		s.mu.Unlock()
		if !sealed {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// installLocked puts the RMK in locked memory. It audits the unseal first
// and refuses if the record cannot be written.
func (s *Server) installLocked(ctx context.Context, rmk secret.Bytes, by string) error {
	if s.key != nil {
		return nil
	}
	rec := audit.Record{RequestID: audit.RequestID(ctx), Identity: s.cfg.Source.ID().String(), Operation: "distributor/unseal",
		Target: audit.Target{Resource: "genesis/" + s.manifest.GetGenesisId()}, Outcome: audit.OutcomeOK, Reason: "unsealed by " + by}
	if err := s.writeAudit(context.WithoutCancel(ctx), rec); err != nil {
		return fmt.Errorf("distributor: audit log unavailable, refusing to unseal: %w", err)
	}
	k, err := newRootKey(rmk)
	if err != nil {
		return err
	}
	s.key, s.unsealedAt, s.unsealedBy = k, s.cfg.Now(), by
	s.emergency = false
	s.notifyLocked()
	s.log.Info("distributor: unsealed", "by", by, "genesis_id", s.manifest.GetGenesisId())
	return nil
}

// writeAudit writes a record of the server's own (unseal, rekey, manifest
// install, emergency seal).
func (s *Server) writeAudit(ctx context.Context, rec audit.Record) error {
	if s.auditHook != nil {
		return s.auditHook(ctx, rec)
	}
	return s.cfg.Audit.Write(ctx, rec)
}

func (s *Server) dropKeyLocked(why string) {
	if s.key == nil {
		return
	}
	if err := s.key.wipe(); err != nil {
		s.log.Error("distributor: wiping the root key", "err", err)
	}
	s.key = nil
	s.notifyLocked()
	s.log.Warn("distributor: sealed", "why", why)
}

func (s *Server) notifyLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// GetStatus implements the Distributor service.
func (s *Server) GetStatus(ctx context.Context, _ *distributorv1.GetStatusRequest) (*distributorv1.GetStatusResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := &distributorv1.GetStatusResponse{State: distributorv1.SealState_SEAL_STATE_SEALED}
	if s.lastHandout != nil {
		out.LastHandout = proto.Clone(s.lastHandout).(*distributorv1.Handout)
	}
	if s.manifest != nil {
		out.GenesisId, out.Kcv, out.Epoch = s.manifest.GetGenesisId(), s.manifest.GetKcv(), s.manifest.GetEpoch()
		out.ManifestSha256, _ = safe.ManifestHash(s.manifest)
	}
	out.EmergencySealed = s.emergency
	if s.key != nil {
		out.State = distributorv1.SealState_SEAL_STATE_UNSEALED
		out.UnsealedAt, out.UnsealedBy = timestamppb.New(s.unsealedAt), s.unsealedBy
	}
	// Copies: the peer loop updates these while gRPC marshals the reply.
	for _, a := range s.cfg.PeerAddrs {
		out.Peers = append(out.Peers, proto.Clone(s.peers[a]).(*distributorv1.PeerStatus))
	}
	if s.ceremony != nil {
		out.Ceremony = s.ceremonyViewLocked(ctx, s.ceremony)
	}
	return out, nil
}

// ceremonyViewLocked is the ceremony's public view as the caller may see it
// (GetStatus and GetCeremony, which anyone may call). A rekey's sealed new
// shares go to officers only: anyone may watch a ceremony's progress, but
// the shares (sealed to the rekeying officer's keys, so still unreadable)
// are no one else's business.
func (s *Server) ceremonyViewLocked(ctx context.Context, c *ceremony) *distributorv1.Ceremony {
	_ = c.checkOpen(s.cfg.Now())
	out := c.proto()
	if id, _ := identity.FromContext(ctx); len(out.GetRekeyedShares()) > 0 && !s.cfg.Officers.Allows(id) {
		out.RekeyedShares = nil
	}
	return out
}

// FetchRootKey implements the Distributor service.
func (s *Server) FetchRootKey(ctx context.Context, req *distributorv1.FetchRootKeyRequest) (*distributorv1.FetchRootKeyResponse, error) {
	caller, _ := identity.FromContext(ctx)
	resp, refusal, err := s.fetchRootKey(ctx, caller, req)
	if err != nil {
		s.metrics.refused(refusal)
		return nil, err
	}
	s.metrics.handedOut(caller)
	return resp, nil
}

// fetchRootKey is FetchRootKey; a refusal comes with its reason for the
// metrics.
func (s *Server) fetchRootKey(ctx context.Context, caller identity.ID, req *distributorv1.FetchRootKeyRequest) (*distributorv1.FetchRootKeyResponse, string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.key == nil {
		return nil, refusedSealed, status.Error(codes.FailedPrecondition, "distributor: sealed; it has no root key to hand out (unseal it by ceremony or from a peer)")
	}
	if req.GetGenesisId() != s.manifest.GetGenesisId() {
		return nil, refusedInvalid, status.Errorf(codes.InvalidArgument, "distributor: this distributor holds genesis %s, not %q", s.manifest.GetGenesisId(), req.GetGenesisId())
	}
	info, err := hpkeseal.Info(infoRootKey, s.manifest.GetGenesisId(), caller.String())
	if err != nil {
		return nil, refusedOther, status.Error(codes.Internal, err.Error())
	}
	key := s.key.secret()
	raw := key.Data()
	sealed, err := hpkeseal.Seal(req.GetRecipient(), info, raw)
	clear(raw)
	key.Wipe()
	if err != nil {
		return nil, refusedInvalid, status.Errorf(codes.InvalidArgument, "distributor: bad recipient key: %v", err)
	}
	s.lastHandout = &distributorv1.Handout{Identity: caller.String(), Time: timestamppb.New(s.cfg.Now())}
	audit.AddTarget(ctx, audit.Target{Resource: "genesis/" + s.manifest.GetGenesisId()})
	return &distributorv1.FetchRootKeyResponse{SealedRootKey: sealed, GenesisId: s.manifest.GetGenesisId(), Kcv: s.manifest.GetKcv()}, "", nil
}

// OpenCeremony implements the Distributor service.
func (s *Server) OpenCeremony(ctx context.Context, req *distributorv1.OpenCeremonyRequest) (*distributorv1.Ceremony, error) {
	now := s.cfg.Now()
	ttl := s.cfg.CeremonyTTL
	if req.GetTtlSeconds() > 0 {
		ttl = time.Duration(req.GetTtlSeconds()) * time.Second
		if ttl > s.cfg.MaxCeremonyTTL {
			return nil, status.Errorf(codes.InvalidArgument, "distributor: ceremony TTL %s exceeds the maximum %s", ttl, s.cfg.MaxCeremonyTTL)
		}
	}
	if req.GetRekey() != nil && req.GetKind() != distributorv1.CeremonyKind_CEREMONY_KIND_REKEY {
		return nil, status.Error(codes.InvalidArgument, "distributor: a rekey plan belongs to a rekey ceremony only")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.key != nil && req.GetKind() != distributorv1.CeremonyKind_CEREMONY_KIND_REKEY {
		return nil, status.Error(codes.FailedPrecondition, "distributor: already unsealed; no ceremony needed")
	}
	if s.ceremony != nil && s.ceremony.checkOpen(now) == nil {
		return nil, status.Errorf(codes.FailedPrecondition, "distributor: ceremony %s is already open (cancel it first)", s.ceremony.id)
	}
	var (
		m        *safev1.GenesisManifest
		newSlots []safe.NewSlot
	)
	switch req.GetKind() {
	case distributorv1.CeremonyKind_CEREMONY_KIND_UNSEAL:
		if len(req.GetManifest()) != 0 {
			return nil, status.Error(codes.InvalidArgument, "distributor: an unseal ceremony uses the pinned manifest; do not send one")
		}
		if s.manifest == nil {
			return nil, status.Error(codes.FailedPrecondition, "distributor: not provisioned (no genesis manifest); run a provisioning ceremony")
		}
		// Pick up a rekeyed manifest of the same lineage.
		fresh, err := s.reloadManifestLocked()
		if err != nil {
			return nil, status.Error(codes.FailedPrecondition, err.Error())
		}
		m = fresh
	case distributorv1.CeremonyKind_CEREMONY_KIND_REKEY:
		if len(req.GetManifest()) != 0 {
			return nil, status.Error(codes.InvalidArgument, "distributor: a rekey ceremony re-splits the pinned manifest; do not send one")
		}
		if s.manifest == nil {
			return nil, status.Error(codes.FailedPrecondition, "distributor: not provisioned (no genesis manifest); nothing to rekey")
		}
		slots, err := rekeySlots(req.GetRekey(), s.cfg.Source.TrustDomain())
		if err != nil {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
		newSlots = slots
		fresh, err := s.reloadManifestLocked()
		if err != nil {
			return nil, status.Error(codes.FailedPrecondition, err.Error())
		}
		m = fresh
	case distributorv1.CeremonyKind_CEREMONY_KIND_PROVISION:
		if s.emergency {
			return nil, status.Error(codes.FailedPrecondition, "distributor: emergency-sealed; only an unseal ceremony (K officers) unseals it, not a provisioning")
		}
		pm, err := safe.ParseManifest(req.GetManifest())
		if err == nil {
			err = CheckManifest(pm, s.cfg.Source.TrustDomain())
		}
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "distributor: %v", err)
		}
		if s.manifest != nil && (pm.GetGenesisId() != s.manifest.GetGenesisId() || string(pm.GetKcv()) != string(s.manifest.GetKcv())) {
			return nil, status.Errorf(codes.FailedPrecondition, "distributor: pinned to genesis %s; refusing to provision genesis %s (a new lineage needs a new distributor state)", s.manifest.GetGenesisId(), pm.GetGenesisId())
		}
		m = pm
	default:
		return nil, status.Errorf(codes.InvalidArgument, "distributor: unknown ceremony kind %v", req.GetKind())
	}
	c, err := openCeremony(req.GetKind(), m, now, ttl)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	c.plan, c.newSlots = req.GetRekey(), newSlots
	s.ceremony = c
	audit.AddTarget(ctx, audit.Target{Resource: "ceremony/" + c.id})
	s.log.Info("distributor: ceremony opened", "id", c.id, "kind", c.kind.String(), "genesis_id", m.GetGenesisId(), "threshold", m.GetThreshold(), "expires", c.expiresAt)
	return c.proto(), nil
}

// reloadManifestLocked rereads the manifest file; it must be the pinned
// lineage (same genesis id and KCV) at the same or a later epoch.
func (s *Server) reloadManifestLocked() (*safev1.GenesisManifest, error) {
	m, err := safe.ReadManifest(s.cfg.ManifestPath)
	if err == nil {
		err = CheckManifest(m, s.cfg.Source.TrustDomain())
	}
	if err != nil {
		return nil, err
	}
	if m.GetGenesisId() != s.manifest.GetGenesisId() || string(m.GetKcv()) != string(s.manifest.GetKcv()) || m.GetEpoch() < s.manifest.GetEpoch() {
		return nil, fmt.Errorf("distributor: manifest %s now holds genesis %s epoch %d, not pinned genesis %s epoch >= %d; refusing it",
			s.cfg.ManifestPath, m.GetGenesisId(), m.GetEpoch(), s.manifest.GetGenesisId(), s.manifest.GetEpoch())
	}
	s.manifest = m
	return m, nil
}

func (s *Server) currentCeremonyLocked(id string) (*ceremony, error) {
	if s.ceremony == nil || s.ceremony.id != id {
		return nil, fmt.Errorf("%w: %q", errNoCeremony, id)
	}
	return s.ceremony, nil
}

// SubmitShare implements the Distributor service.
func (s *Server) SubmitShare(ctx context.Context, req *distributorv1.SubmitShareRequest) (*distributorv1.SubmitShareResponse, error) {
	officer, _ := identity.FromContext(ctx)
	s.mu.Lock()
	defer s.mu.Unlock()
	c, err := s.currentCeremonyLocked(req.GetCeremonyId())
	if err != nil {
		return nil, toStatus(err)
	}
	audit.AddTarget(ctx, audit.Target{Resource: fmt.Sprintf("ceremony/%s/share/%d", c.id, req.GetShareIndex())})
	rmk, err := c.submit(officer, req.GetShareIndex(), req.GetSealedShare(), s.cfg.Now())
	if err != nil {
		s.log.Warn("distributor: share refused", "ceremony", c.id, "index", req.GetShareIndex(), "officer", officer.String(), "err", err)
		return nil, toStatus(err)
	}
	s.log.Info("distributor: share accepted", "ceremony", c.id, "index", req.GetShareIndex(), "officer", officer.String(), "have", len(c.accepted), "threshold", c.manifest.GetThreshold())
	if !rmk.IsZero() {
		defer rmk.Wipe()
		if err := s.completeLocked(ctx, c, rmk); err != nil {
			// Fail closed, but keep the ceremony: the last share is taken
			// back and the other shares stay, so that officer submits
			// again once the cause (e.g. the audit log) is fixed.
			c.takeBack()
			s.log.Error("distributor: the shares combined but the ceremony could not complete; the last share is taken back, the ceremony stays open",
				"ceremony", c.id, "index", req.GetShareIndex(), "err", err)
			return nil, status.Error(codes.Unavailable, err.Error()+"; the ceremony stays open: submit this share again")
		}
	}
	return &distributorv1.SubmitShareResponse{Ceremony: c.proto()}, nil
}

// completeLocked uses the key an unseal or rekey ceremony rebuilt, and ends
// the ceremony only if that worked.
func (s *Server) completeLocked(ctx context.Context, c *ceremony, rmk secret.Bytes) error {
	if c.kind == distributorv1.CeremonyKind_CEREMONY_KIND_REKEY {
		return s.rekeyLocked(ctx, c, rmk)
	}
	if s.key == nil {
		if err := s.installLocked(ctx, rmk, "ceremony:"+c.id); err != nil {
			return err
		}
	}
	s.manifest = c.manifest
	s.emergency = false
	c.end(distributorv1.CeremonyState_CEREMONY_STATE_SUCCEEDED, "root key reconstructed and matched the KCV")
	return nil
}

// rekeyLocked splits the rebuilt key anew for the ceremony's plan. The
// result (the new manifest and the new shares, sealed to the new safes'
// keys) is released only once its audit record is written.
func (s *Server) rekeyLocked(ctx context.Context, c *ceremony, rmk secret.Bytes) error {
	m, sealed, err := c.resplit(rmk, s.cfg.Now())
	if err != nil {
		return err
	}
	h, err := safe.ManifestHash(m)
	if err != nil {
		return err
	}
	rec := audit.Record{RequestID: audit.RequestID(ctx), Identity: s.cfg.Source.ID().String(), Operation: "distributor/rekey",
		Target: audit.Target{Resource: "genesis/" + m.GetGenesisId()}, Outcome: audit.OutcomeOK,
		Reason: fmt.Sprintf("ceremony %s: shares %v of epoch %d from %v re-split %d-of-%d as epoch %d, manifest sha256 %x",
			c.id, c.accepted, c.manifest.GetEpoch(), c.officers, m.GetThreshold(), len(m.GetSlots()), m.GetEpoch(), h)}
	if err := s.writeAudit(context.WithoutCancel(ctx), rec); err != nil {
		return fmt.Errorf("distributor: audit log unavailable, refusing to release the rekeyed shares: %w", err)
	}
	s.log.Info("distributor: rekeyed", "ceremony", c.id, "genesis_id", m.GetGenesisId(), "epoch", m.GetEpoch(), "threshold", m.GetThreshold(), "shares", len(m.GetSlots()))
	return c.setRekeyed(m, sealed)
}

// ProvisionRootKey implements the Distributor service.
func (s *Server) ProvisionRootKey(ctx context.Context, req *distributorv1.ProvisionRootKeyRequest) (*distributorv1.ProvisionRootKeyResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, err := s.currentCeremonyLocked(req.GetCeremonyId())
	if err != nil {
		return nil, toStatus(err)
	}
	audit.AddTarget(ctx, audit.Target{Resource: "ceremony/" + c.id})
	rmk, err := c.provision(req.GetSealedRootKey(), s.cfg.Now())
	if err != nil {
		return nil, toStatus(err)
	}
	defer rmk.Wipe()
	if s.manifest == nil {
		if err := safe.WriteManifest(s.cfg.ManifestPath, c.manifest); err != nil {
			c.end(distributorv1.CeremonyState_CEREMONY_STATE_FAILED, "could not pin the manifest")
			return nil, status.Errorf(codes.Internal, "distributor: pinning the manifest: %v", err)
		}
	}
	s.manifest = c.manifest
	if err := s.installLocked(ctx, rmk, "genesis:"+c.id); err != nil {
		// The ceremony stays open: genesis may hand the key over again.
		return nil, status.Error(codes.Unavailable, err.Error()+"; the ceremony stays open: provision again")
	}
	c.end(distributorv1.CeremonyState_CEREMONY_STATE_SUCCEEDED, "root key provisioned and matched the KCV")
	return &distributorv1.ProvisionRootKeyResponse{Ceremony: c.proto()}, nil
}

// GetCeremony implements the Distributor service.
func (s *Server) GetCeremony(ctx context.Context, req *distributorv1.GetCeremonyRequest) (*distributorv1.Ceremony, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, err := s.currentCeremonyLocked(req.GetCeremonyId())
	if err != nil {
		return nil, toStatus(err)
	}
	return s.ceremonyViewLocked(ctx, c), nil
}

// CancelCeremony implements the Distributor service.
func (s *Server) CancelCeremony(ctx context.Context, req *distributorv1.CancelCeremonyRequest) (*distributorv1.Ceremony, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, err := s.currentCeremonyLocked(req.GetCeremonyId())
	if err != nil {
		return nil, toStatus(err)
	}
	audit.AddTarget(ctx, audit.Target{Resource: "ceremony/" + c.id})
	if err := c.checkOpen(s.cfg.Now()); err != nil {
		return nil, toStatus(err)
	}
	c.end(distributorv1.CeremonyState_CEREMONY_STATE_CANCELLED, "cancelled: "+req.GetReason())
	return c.proto(), nil
}

// Seal implements the Distributor service.
func (s *Server) Seal(ctx context.Context, req *distributorv1.SealRequest) (*distributorv1.SealResponse, error) {
	if req.GetReason() == "" {
		return nil, status.Error(codes.InvalidArgument, "distributor: Seal needs a reason (it is audited)")
	}
	caller, _ := identity.FromContext(ctx)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dropKeyLocked("Seal: " + req.GetReason())
	if req.GetEmergency() {
		// Sealing is the safe direction: it happens even if the record
		// cannot be written (the call itself is audited too).
		if !s.emergency {
			s.emergency = true
			s.notifyLocked() // the peer loop stops fetching at once
		}
		rec := audit.Record{RequestID: audit.RequestID(ctx), Identity: caller.String(), Operation: "distributor/emergency-seal",
			Target: audit.Target{Resource: "genesis/" + s.manifest.GetGenesisId()}, Outcome: audit.OutcomeOK, Reason: req.GetReason()}
		if err := s.writeAudit(context.WithoutCancel(ctx), rec); err != nil {
			s.log.Error("distributor: emergency-sealed, but the audit record could not be written", "err", err)
		}
		s.log.Warn("distributor: emergency-sealed; fetching from no peer until an unseal ceremony", "by", caller.String())
	}
	return &distributorv1.SealResponse{State: distributorv1.SealState_SEAL_STATE_SEALED}, nil
}

// InstallManifest implements the Distributor service: it pins a rekeyed
// manifest of the pinned lineage (the next epoch, linked to the pinned one).
func (s *Server) InstallManifest(ctx context.Context, req *distributorv1.InstallManifestRequest) (*distributorv1.InstallManifestResponse, error) {
	m, err := safe.ParseManifest(req.GetManifest())
	if err == nil {
		err = CheckManifest(m, s.cfg.Source.TrustDomain())
	}
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "distributor: %v", err)
	}
	h, err := safe.ManifestHash(m)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "distributor: %v", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.manifest == nil {
		return nil, status.Error(codes.FailedPrecondition, "distributor: not provisioned (no genesis manifest); a rekeyed manifest needs its predecessor pinned")
	}
	audit.AddTarget(ctx, audit.Target{Resource: fmt.Sprintf("genesis/%s/epoch/%d", m.GetGenesisId(), m.GetEpoch())})
	if err := safe.CheckSuccessor(s.manifest, m); err != nil {
		if pinned, _ := safe.ManifestHash(s.manifest); subtle.ConstantTimeCompare(pinned, h) == 1 {
			return &distributorv1.InstallManifestResponse{Epoch: m.GetEpoch(), ManifestSha256: h}, nil // pinned already
		}
		return nil, status.Errorf(codes.FailedPrecondition, "distributor: not the successor of the pinned manifest; refused: %v", err)
	}
	caller, _ := identity.FromContext(ctx)
	rec := audit.Record{RequestID: audit.RequestID(ctx), Identity: caller.String(), Operation: "distributor/install-manifest",
		Target: audit.Target{Resource: "genesis/" + m.GetGenesisId()}, Outcome: audit.OutcomeOK,
		Reason: fmt.Sprintf("epoch %d -> %d (%d-of-%d), manifest sha256 %x", s.manifest.GetEpoch(), m.GetEpoch(), m.GetThreshold(), len(m.GetSlots()), h)}
	if err := s.writeAudit(context.WithoutCancel(ctx), rec); err != nil {
		return nil, status.Errorf(codes.Unavailable, "distributor: audit log unavailable, refusing to pin the manifest: %v", err)
	}
	if _, err := PinManifest(s.cfg.ManifestPath, m); err != nil {
		return nil, status.Errorf(codes.Internal, "distributor: pinning the manifest: %v", err)
	}
	s.manifest = m
	s.log.Info("distributor: rekeyed manifest pinned", "genesis_id", m.GetGenesisId(), "epoch", m.GetEpoch())
	return &distributorv1.InstallManifestResponse{Epoch: m.GetEpoch(), ManifestSha256: h, Changed: true}, nil
}

// toStatus is the one table from domain errors to gRPC status codes.
func toStatus(err error) error {
	code := codes.Internal
	switch {
	case errors.Is(err, errNoCeremony):
		code = codes.NotFound
	case errors.Is(err, errCeremonyExpired), errors.Is(err, errCeremonyClosed), errors.Is(err, errWrongKind):
		code = codes.FailedPrecondition
	case errors.Is(err, safe.ErrDuplicateShare), errors.Is(err, errOfficerRepeated):
		code = codes.AlreadyExists
	case errors.Is(err, errOfficerNotOnSlot):
		code = codes.PermissionDenied
	case errors.Is(err, safe.ErrUnknownShare), errors.Is(err, safe.ErrBadShare), errors.Is(err, errUnreadableShare), errors.Is(err, errShareMismatch):
		code = codes.InvalidArgument
	case errors.Is(err, safe.ErrKCVMismatch):
		code = codes.Aborted
	}
	return status.Error(code, err.Error())
}
