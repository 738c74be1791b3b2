package distributor

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"math/big"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/peer"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/hpkeseal"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/secret"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	"github.com/cairnkms/cairn/safe"
)

// errPeerKCV: a peer handed out a key that is not the pinned RMK.
var errPeerKCV = errors.New("distributor: peer's root key does not match the pinned KCV; refused")

// peerLoop unseals from peers while sealed (jittered exponential backoff)
// and refreshes peer status while unsealed, until Close.
func (s *Server) peerLoop() {
	if len(s.cfg.PeerAddrs) == 0 {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { <-s.stop; cancel() }()

	backoff := s.cfg.PeerRetryMin
	for {
		s.mu.Lock()
		sealed, provisioned, emergency, changed := s.key == nil, s.manifest != nil, s.emergency, s.changed
		s.mu.Unlock()
		wait := s.cfg.PeerPollInterval
		if emergency {
			// Emergency-sealed: no peer is asked for the key (or even its
			// status) until an unseal ceremony changes the state.
			select {
			case <-ctx.Done():
				return
			case <-changed:
			}
			continue
		}
		if sealed && provisioned {
			if s.fetchFromPeers(ctx) {
				backoff = s.cfg.PeerRetryMin
				continue
			}
			wait = jitter(backoff)
			backoff = min(2*backoff, s.cfg.PeerRetryMax)
		} else {
			s.pollPeers(ctx)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-changed: // sealed or unsealed: act at once
			t.Stop()
		case <-t.C:
		}
	}
}

// jitter returns a duration uniformly in [d/2, d).
func jitter(d time.Duration) time.Duration {
	if d <= 1 {
		return d
	}
	n, _ := rand.Int(rand.Reader, big.NewInt(int64(d/2)))
	return d/2 + time.Duration(n.Int64())
}

func (s *Server) dialPeer(addr string) (*grpc.ClientConn, error) {
	// The peer must be an allowed distributor: a server with another
	// identity never sees our request, let alone hands us a key.
	creds := identity.ClientCredentials(s.cfg.Source, s.cfg.Peers.Authorize)
	return grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
}

// fetchFromPeers tries every peer once; it reports whether the distributor
// is now unsealed.
func (s *Server) fetchFromPeers(ctx context.Context) bool {
	for _, addr := range s.cfg.PeerAddrs {
		err := s.fetchFromPeer(ctx, addr)
		if err == nil {
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		s.log.Debug("distributor: peer fetch failed", "peer", addr, "err", err)
	}
	return false
}

func (s *Server) fetchFromPeer(ctx context.Context, addr string) (err error) {
	s.mu.Lock()
	m := s.manifest
	s.mu.Unlock()
	conn, err := s.dialPeer(addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	client := distributorv1.NewDistributorClient(conn)
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	// The outcome of the whole fetch is the peer's error (or clears it).
	defer func() { s.peerResult(addr, err) }()

	var pr peer.Peer
	st, err := client.GetStatus(cctx, &distributorv1.GetStatusRequest{}, grpc.Peer(&pr))
	if err != nil {
		return err
	}
	s.peerSeen(addr, peerID(&pr), st.GetState())
	if st.GetState() != distributorv1.SealState_SEAL_STATE_UNSEALED {
		return fmt.Errorf("peer %s is sealed", addr)
	}
	r, err := hpkeseal.NewRecipient()
	if err != nil {
		return err
	}
	defer r.Close()
	resp, err := client.FetchRootKey(cctx, &distributorv1.FetchRootKeyRequest{Recipient: r.PublicKey(), GenesisId: m.GetGenesisId()})
	if err != nil {
		return err
	}
	info, err := hpkeseal.Info(infoRootKey, m.GetGenesisId(), s.cfg.Source.ID().String())
	if err != nil {
		return err
	}
	rmk, err := r.Open(resp.GetSealedRootKey(), info)
	if err != nil {
		return fmt.Errorf("peer %s: %w", addr, err)
	}
	defer rmk.Wipe()
	return s.installFromPeer(ctx, addr, rmk)
}

// installFromPeer accepts a key fetched from a peer only if it has the
// pinned KCV.
func (s *Server) installFromPeer(ctx context.Context, addr string, rmk secret.Bytes) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.emergency {
		return fmt.Errorf("distributor: emergency-sealed while fetching from peer %s; key discarded", addr)
	}
	if !safe.CheckKCV(rmk, s.manifest) {
		s.log.Error("distributor: peer handed out a key that is not the pinned root key", "peer", addr)
		return fmt.Errorf("%w (peer %s)", errPeerKCV, addr)
	}
	return s.installLocked(ctx, rmk, "peer:"+addr)
}

// pollPeers refreshes the peers' status for GetStatus.
func (s *Server) pollPeers(ctx context.Context) {
	for _, addr := range s.cfg.PeerAddrs {
		conn, err := s.dialPeer(addr)
		if err != nil {
			s.peerResult(addr, err)
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		var pr peer.Peer
		st, err := distributorv1.NewDistributorClient(conn).GetStatus(cctx, &distributorv1.GetStatusRequest{}, grpc.Peer(&pr))
		cancel()
		conn.Close()
		if err == nil {
			s.peerSeen(addr, peerID(&pr), st.GetState())
		}
		s.peerResult(addr, err)
	}
}

// peerID is the verified SPIFFE ID of the server a call reached, or "".
func peerID(p *peer.Peer) string {
	if info, ok := p.AuthInfo.(identity.AuthInfo); ok {
		return info.ID.String()
	}
	return ""
}

// peerSeen records that a peer answered, with its identity and state.
func (s *Server) peerSeen(addr, id string, state distributorv1.SealState) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.peers[addr]
	if p == nil {
		return
	}
	if id != "" {
		p.Id = id
	}
	p.State = state
	p.LastSeen = timestamppb.New(s.cfg.Now())
}

// peerResult records the outcome of an exchange with a peer: its error, or
// none.
func (s *Server) peerResult(addr string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if p := s.peers[addr]; p != nil {
		p.LastError = ""
		if err != nil {
			p.LastError = err.Error()
		}
	}
}
