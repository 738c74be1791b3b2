package rootkms

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/grpcserver"
	"github.com/cairnkms/cairn/internal/hpkeseal"
	"github.com/cairnkms/cairn/internal/identity"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms/fsm"
	"github.com/cairnkms/cairn/rootkms/raftnode"
	"github.com/cairnkms/cairn/rootkms/rootkey"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
)

const svc = "/cairn.rootkms.v1.RootKMS/"

// Server is a root KMS replica: New, then Start, then Close.
type Server struct {
	rootkmsv1.UnimplementedRootKMSServer

	cfg   Config
	log   *slog.Logger
	fsm   *fsm.FSM
	grpc  *grpc.Server
	node  *raftnode.Node
	layer *raftnode.StreamLayer

	apiAddr, raftAddr string

	key       atomic.Pointer[rootkey.Key]
	keyStatus atomic.Value  // string: why the root key is not loaded yet
	dropped   chan struct{} // DropRootKey wakes rootKeyLoop to fetch again
	// keyMu orders installing a fetched key against dropping it: drops
	// counts the drops, and a fetch installs its key only if no drop came
	// since it started (see fetchRootKey).
	keyMu sync.Mutex
	drops uint64

	metrics *metrics
	// running is the Raft node's raft once Start opened it, for Readiness
	// and the metrics (which may run before Start); startedAt is when
	// Start began (unix nanoseconds).
	running   atomic.Pointer[raft.Raft]
	startedAt atomic.Int64
	// startIndex is the last index of this replica's log when Start
	// opened it, and startTerm that entry's term (0 if the log held no
	// entry there); caughtUp latches once the state has applied it (or
	// the log the leader left of it) and what a leader since said was
	// committed (see caughtUp).
	startIndex, startTerm uint64
	synced                atomic.Bool

	writeMu sync.Mutex // serialises the leader's read-decide-apply writes

	peers peerConns // connections to the other voters: their clocks (clockquorum.go) and whether they hold the root key (keyless.go)

	// keylessSince is when this replica, leading, was last found without
	// the root key (zero: it has it, or does not lead); memberLoop's only.
	keylessSince time.Time

	stop      chan struct{}
	wg        sync.WaitGroup
	closeOnce sync.Once
	serveErr  chan error
}

// New checks the configuration and prepares a replica.
func New(cfg Config) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	s := &Server{
		cfg: cfg, log: cfg.Logger,
		fsm:  fsm.New(cfg.Manifest.GetGenesisId(), cfg.Manifest.GetKcv()),
		stop: make(chan struct{}), serveErr: make(chan error, 1), dropped: make(chan struct{}, 1),
	}
	s.keyStatus.Store("waiting for the root key from the distributors")
	var err error
	if s.metrics, err = newMetrics(s, cfg.Registry); err != nil {
		return nil, err
	}
	joinAuth := func(id identity.ID) error {
		if s.cfg.Operators.Allows(id) || s.cfg.Replicas.Allows(id) {
			return nil
		}
		return fmt.Errorf("%w: %s may not change membership", identity.ErrPermissionDenied, id)
	}
	backupAuth := func(id identity.ID) error {
		if s.cfg.Operators.Allows(id) || s.cfg.Officers.Allows(id) {
			return nil
		}
		return fmt.Errorf("%w: %s may not export backups (operators and security officers may)", identity.ErrPermissionDenied, id)
	}
	kmsOnly, _ := identity.ParseAllowlist(cfg.Source.TrustDomain(), "kms/*/*")
	policy := identity.Policy{
		svc + "UnwrapRegionKey":        kmsOnly.Authorize, // and only of the region asked for: see UnwrapRegionKey
		svc + "GetRegion":              identity.AllowAny(),
		svc + "ListRegions":            identity.AllowAny(),
		svc + "GetClusterStatus":       identity.AllowAny(),
		svc + "CreateRegion":           cfg.Regionctl.Authorize,
		svc + "RotateRegionKey":        cfg.Regionctl.Authorize,
		svc + "RetireRegionKeyVersion": cfg.Regionctl.Authorize,
		svc + "CreateKeyset":           cfg.Regionctl.Authorize,
		svc + "GetKeyset":              cfg.Regionctl.Authorize,
		svc + "ListKeysets":            cfg.Regionctl.Authorize,
		svc + "UpdateKeyset":           cfg.Regionctl.Authorize,
		svc + "SetKeysetPolicy":        cfg.Regionctl.Authorize,
		svc + "RecordPropagation":      cfg.Regionctl.Authorize,
		svc + "RecordBundleSerial":     cfg.Regionctl.Authorize,
		svc + "PutRollout":             cfg.Regionctl.Authorize,
		svc + "GetRollout":             cfg.Regionctl.Authorize,
		svc + "ListRollouts":           cfg.Regionctl.Authorize,
		svc + "Join":                   joinAuth, // a replica may only join itself: see Join
		svc + "Remove":                 s.cfg.Operators.Authorize,
		svc + "Snapshot":               s.cfg.Operators.Authorize,
		svc + "DropRootKey":            s.cfg.Officers.Authorize,
		svc + "ExportBackup":           backupAuth,
		svc + "RestoreBackup":          s.cfg.Officers.Authorize,
	}
	s.grpc, err = grpcserver.New(grpcserver.Options{
		Source: cfg.Source, Policy: policy, Audit: cfg.Audit,
		Ready: s.Readiness, Reflection: cfg.Reflection,
		Mutating: []string{svc + "CreateRegion", svc + "RotateRegionKey", svc + "RetireRegionKeyVersion", svc + "CreateKeyset",
			svc + "UpdateKeyset", svc + "SetKeysetPolicy", svc + "RecordPropagation", svc + "RecordBundleSerial", svc + "PutRollout", svc + "Join", svc + "Remove", svc + "Snapshot", svc + "DropRootKey",
			svc + "ExportBackup", svc + "RestoreBackup"},
		// A usage observation of a region with thousands of keysets, or a
		// keyset record with its copies, is far above the 64 KiB default.
		MaxRecvMsgSize: MaxMessageSize,
		Unaudited:      []string{svc + "GetClusterStatus"},
		Registerer:     s.metrics.reg,
	})
	if err != nil {
		return nil, err
	}
	rootkmsv1.RegisterRootKMSServer(s.grpc, s)
	return s, nil
}

// Start opens Raft on raftLis, serves the API on apiLis, and starts fetching
// the root key. The replica answers status at once and everything else once
// it holds the root key.
func (s *Server) Start(apiLis, raftLis net.Listener) error {
	s.apiAddr = s.cfg.APIAdvertise
	if s.apiAddr == "" {
		s.apiAddr = apiLis.Addr().String()
	}
	var advertise net.Addr = raftLis.Addr()
	if s.cfg.RaftAdvertise != "" {
		a, err := net.ResolveTCPAddr("tcp", s.cfg.RaftAdvertise)
		if err != nil {
			return fmt.Errorf("rootkms: raft advertise address: %w", err)
		}
		advertise = a
	}
	s.raftAddr = advertise.String()
	s.startedAt.Store(time.Now().UnixNano())
	s.layer = raftnode.NewStreamLayer(raftLis, advertise, s.cfg.Source, s.cfg.Replicas.Authorize, s.log)
	node, err := raftnode.Open(raftnode.Config{
		ID: s.cfg.ID, Dir: s.cfg.DataDir, FSM: timedFSM{FSM: s.fsm, m: s.metrics}, Transport: raftnode.NewTransport(s.layer, s.log),
		Bootstrap: s.cfg.Bootstrap, Logger: s.log,
		HeartbeatTimeout: s.cfg.HeartbeatTimeout, ElectionTimeout: s.cfg.ElectionTimeout, LeaderLeaseTimeout: s.cfg.LeaderLeaseTimeout,
		WrapLogStore: s.cfg.WrapLogStore, WrapStableStore: s.cfg.WrapStableStore,
	})
	if err != nil {
		s.layer.Close()
		return err
	}
	s.node = node
	s.startIndex = node.Raft.LastIndex()
	if s.startTerm, _, err = node.LogTerm(s.startIndex); err != nil {
		node.Close()
		s.layer.Close()
		return fmt.Errorf("rootkms: reading the last entry of the raft log in %s: %w", s.cfg.DataDir, err)
	}
	s.running.Store(node.Raft)
	s.wg.Add(3)
	go func() { defer s.wg.Done(); s.serveErr <- s.grpc.Serve(apiLis) }()
	go func() { defer s.wg.Done(); s.rootKeyLoop() }()
	go func() { defer s.wg.Done(); s.memberLoop() }()
	s.log.Info("rootkms: started", "id", s.cfg.ID, "api", s.apiAddr, "raft", s.raftAddr)
	return nil
}

// Close stops serving, shuts Raft down and wipes the key.
func (s *Server) Close() error {
	var err error
	s.closeOnce.Do(func() {
		close(s.stop)
		if s.grpc != nil {
			s.grpc.Stop()
		}
		s.wg.Wait()
		if s.node != nil {
			err = s.node.Close()
		}
		if s.layer != nil {
			s.layer.Close()
		}
		s.peers.close()
		if k := s.key.Swap(nil); k != nil {
			k.Close()
		}
	})
	return err
}

// Raft returns the replica's Raft node (for tests and operators).
func (s *Server) Raft() *raft.Raft { return s.node.Raft }

// AppliedIndex is the index of the last log entry this replica's state
// machine has applied (raft's own AppliedIndex can run ahead of it).
func (s *Server) AppliedIndex() uint64 { return s.fsm.AppliedIndex() }

// HasRootKey reports whether the replica fetched and verified the RMK.
func (s *Server) HasRootKey() bool { return s.key.Load() != nil }

// Readiness reports whether the replica is ready: started, holding the
// verified root key, a member of a cluster, knowing its leader, and caught
// up since it started (see caughtUp: a restarted replica that knows its
// leader may still be applying the log, or installing a snapshot, and
// answers from a state that lacks what the cluster has). When not, the
// reason says which is missing. It is cheap (no Raft round trip; the
// catch-up check reads Raft's stats only until it has latched): health
// checks poll it.
func (s *Server) Readiness() (ready bool, reason string) {
	select {
	case <-s.stop:
		return false, "shut down"
	default:
	}
	r := s.running.Load()
	if r == nil {
		return false, "not started"
	}
	if err := s.cfg.Audit.Broken(); err != nil {
		return false, fmt.Sprintf("the audit log is broken (%v): every call is refused; restart the server once its audit sink works", err)
	}
	if !s.HasRootKey() {
		return false, fmt.Sprint(s.keyStatus.Load())
	}
	state := r.State()
	if state == raft.Shutdown {
		return false, "raft has shut down"
	}
	if !inConfiguration(r, s.cfg.ID) {
		if len(s.cfg.Join) > 0 {
			return false, "not a member of the cluster yet: joining through " + strings.Join(s.cfg.Join, ", ")
		}
		return false, "not a member of a cluster: this replica's Raft configuration does not name it (bootstrap a new cluster, join it to one, or it was removed)"
	}
	if addr, _ := r.LeaderWithID(); addr == "" {
		return false, fmt.Sprintf("no Raft leader known (this replica is a %s in term %d: an election is running, or it is cut off from a quorum)",
			strings.ToLower(state.String()), r.CurrentTerm())
	}
	if err := s.caughtUp(); err != nil {
		return false, status.Convert(err).Message()
	}
	return true, ""
}

// WaitReady blocks until the replica holds the root key or ctx ends.
func (s *Server) WaitReady(ctx context.Context) error {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for !s.HasRootKey() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("rootkms: %s: %w", s.keyStatus.Load(), ctx.Err())
		case <-t.C:
		}
	}
	return nil
}

// jitter returns a duration uniformly in [d/2, d).
func jitter(d time.Duration) time.Duration {
	n, _ := rand.Int(rand.Reader, big.NewInt(int64(d/2)+1))
	return d/2 + time.Duration(n.Int64())
}

// sleep waits d or until Close; it reports whether to go on.
func (s *Server) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-s.stop:
		return false
	case <-t.C:
		return true
	}
}

// rootKeyLoop fetches the RMK from the distributors (any one will do),
// checks it against the pinned KCV, and keeps only the derived wrapping key.
// Once loaded it waits until DropRootKey wipes the key, then fetches again:
// after an emergency seal that succeeds only once the distributors are
// unsealed by a ceremony.
func (s *Server) rootKeyLoop() {
	for {
		s.fetchUntilLoaded()
		select {
		case <-s.stop:
			return
		case <-s.dropped:
		}
	}
}

// fetchUntilLoaded tries the distributors with backoff until one hands out
// the key or Close.
func (s *Server) fetchUntilLoaded() {
	backoff := 200 * time.Millisecond
	for !s.HasRootKey() {
		for _, addr := range s.cfg.Distributors {
			if err := s.fetchRootKey(addr); err != nil {
				s.keyStatus.Store(fmt.Sprintf("waiting for the root key from the distributors (last: %s: %v)", addr, err))
				s.log.Debug("rootkms: root key fetch failed", "distributor", addr, "err", err)
				continue
			}
			s.log.Info("rootkms: root key loaded", "distributor", addr, "genesis_id", s.cfg.Manifest.GetGenesisId())
			return
		}
		if !s.sleep(jitter(backoff)) {
			return
		}
		backoff = min(2*backoff, s.cfg.RootKeyRetryMax)
	}
}

// dropRootKey wipes the key (if loaded) and wakes rootKeyLoop to fetch it
// again. It reports whether there was a key.
func (s *Server) dropRootKey(why string) bool {
	s.keyMu.Lock()
	s.drops++
	s.keyStatus.Store("root key dropped (" + why + "); waiting for the root key from the distributors")
	k := s.key.Swap(nil)
	s.keyMu.Unlock()
	if k != nil {
		k.Close()
		s.log.Warn("rootkms: root key dropped", "why", why)
	}
	select {
	case s.dropped <- struct{}{}:
	default:
	}
	return k != nil
}

// fetchRootKey fetches the key from the distributor at addr and installs
// it, unless DropRootKey was called since it started: a distributor may have
// handed the key out just before an emergency seal, and installing it then
// would undo the seal on this replica. The next fetch asks again, and a
// sealed distributor refuses it.
func (s *Server) fetchRootKey(addr string) error {
	s.keyMu.Lock()
	drops := s.drops
	s.keyMu.Unlock()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(identity.ClientCredentials(s.cfg.Source, s.cfg.DistributorIDs.Authorize)))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	go func() {
		select {
		case <-s.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	r, err := hpkeseal.NewRecipient()
	if err != nil {
		return err
	}
	defer r.Close()
	gid := s.cfg.Manifest.GetGenesisId()
	resp, err := distributorv1.NewDistributorClient(conn).FetchRootKey(ctx, &distributorv1.FetchRootKeyRequest{Recipient: r.PublicKey(), GenesisId: gid})
	if err != nil {
		return err
	}
	info, err := hpkeseal.Info("cairn/distributor/v1/root-key", gid, s.cfg.Source.ID().String())
	if err != nil {
		return err
	}
	rmk, err := r.Open(resp.GetSealedRootKey(), info)
	if err != nil {
		return err
	}
	defer rmk.Wipe()
	k, err := rootkey.New(rmk, s.cfg.Manifest)
	if err != nil {
		return err
	}
	// Checked and installed under keyMu, audit record included, so that
	// the log never says a key was loaded that a drop discarded.
	s.keyMu.Lock()
	defer s.keyMu.Unlock()
	if s.drops != drops {
		k.Close()
		return errors.New("the root key was dropped (DropRootKey) while this fetch was in flight; key discarded")
	}
	rec := audit.Record{Identity: s.cfg.Source.ID().String(), Operation: "rootkms/root-key-loaded", Outcome: audit.OutcomeOK,
		Target: audit.Target{Resource: "genesis/" + gid}, Reason: "from distributor " + addr}
	if err := s.cfg.Audit.Write(context.Background(), rec); err != nil {
		k.Close()
		return fmt.Errorf("audit log unavailable, refusing to load the root key: %w", err)
	}
	s.key.Store(k)
	return nil
}

// memberLoop keeps this replica's API address registered while it leads, and
// joins the cluster when configured to.
//
// Joined means in the Raft configuration and with a member record (the API
// address the others redirect callers to): a Join can stop between the two
// (see Server.Join). A replica in the configuration whose state has not
// caught up may just not have applied its record yet: it waits for that
// rather than ask the leader.
func (s *Server) memberLoop() {
	joined := len(s.cfg.Join) == 0
	backoff := 200 * time.Millisecond
	for {
		tried := false
		if !joined {
			_, registered := s.fsm.State().Member(s.cfg.ID)
			switch member := s.inConfiguration(); {
			case member && registered:
				joined = true
			case member && s.caughtUp() != nil:
				// Its record may be in the log it has not applied yet.
			default:
				tried = true
				if err := s.join(); err != nil {
					s.log.Info("rootkms: join failed; retrying", "err", err)
				} else {
					joined = true
				}
			}
		}
		if s.node.Raft.State() == raft.Leader {
			if m, ok := s.fsm.State().Member(s.cfg.ID); !ok || m.APIAddress != s.apiAddr {
				if err := s.registerSelf(); err != nil {
					s.log.Warn("rootkms: registering this leader's API address", "err", err)
				}
			}
		}
		s.handOffIfKeyless()
		wait := 250 * time.Millisecond
		if tried && !joined {
			wait = jitter(backoff)
			backoff = min(2*backoff, 5*time.Second)
		}
		if !s.sleep(wait) {
			return
		}
	}
}

func (s *Server) inConfiguration() bool { return inConfiguration(s.node.Raft, s.cfg.ID) }

// inConfiguration reports whether r's latest configuration names id (false
// if the configuration cannot be read).
func inConfiguration(r *raft.Raft, id string) bool {
	_, ok, err := configServer(r, id)
	return ok && err == nil
}

// configServer returns server id of r's latest configuration, if it is in it
// (a lock-free read in raft).
func configServer(r *raft.Raft, id string) (raft.Server, bool, error) {
	f := r.GetConfiguration()
	if err := f.Error(); err != nil {
		return raft.Server{}, false, err
	}
	for _, srv := range f.Configuration().Servers {
		if srv.ID == raft.ServerID(id) {
			return srv, true, nil
		}
	}
	return raft.Server{}, false, nil
}

func (s *Server) registerSelf() error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := s.applyLocal(ctx, &statev1.Command{Op: &statev1.Command_RegisterMember{
		RegisterMember: &statev1.RegisterMemberCommand{Member: &statev1.MemberRecord{Id: s.cfg.ID, ApiAddress: s.apiAddr}},
	}})
	return err
}

func (s *Server) join() error {
	c := rootkmsclient.New(s.cfg.Source, s.cfg.Join)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	suffrage := rootkmsv1.Suffrage_SUFFRAGE_VOTER
	if s.cfg.NonVoter {
		suffrage = rootkmsv1.Suffrage_SUFFRAGE_NONVOTER
	}
	return c.Do(ctx, func(ctx context.Context, rc rootkmsv1.RootKMSClient) error {
		_, err := rc.Join(ctx, &rootkmsv1.JoinRequest{Id: s.cfg.ID, Address: s.raftAddr, ApiAddress: s.apiAddr, Suffrage: suffrage})
		return err
	})
}
