package rootkms

import (
	"context"
	"time"

	"github.com/hashicorp/raft"

	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
)

// keylessGrace is how long a leader may lead without the root key before
// it hands leadership to a voter that has it: long enough for a replica
// that has just started, or just had its key dropped by an emergency seal,
// to fetch it from an unsealed distributor (milliseconds), short enough
// that writes are not refused for long while another voter could serve
// them.
const keylessGrace = 2 * time.Second

// handOffIfKeyless moves leadership away from this replica while it leads
// without the root key. Raft elects whichever voter's log is up to date,
// key or not: a replica restarted while every distributor is down (or
// sealed) can win an election, and then answers every write and unwrap
// Unavailable, although other voters still hold the key in RAM. After
// keylessGrace it asks the other voters (GetClusterStatus, as for their
// clocks) and transfers leadership to the first that holds the key; if none
// does, it keeps leading (no voter could do better) and asks again after
// another grace. It runs on memberLoop's goroutine.
func (s *Server) handOffIfKeyless() {
	if s.node.Raft.State() != raft.Leader || s.HasRootKey() {
		s.keylessSince = time.Time{}
		return
	}
	now := time.Now()
	if s.keylessSince.IsZero() {
		s.keylessSince = now
		return
	}
	if now.Sub(s.keylessSince) < keylessGrace {
		return
	}
	s.keylessSince = now // at most one hand-off attempt per grace
	f := s.node.Raft.GetConfiguration()
	if f.Error() != nil {
		return
	}
	st := s.fsm.State()
	for _, srv := range f.Configuration().Servers {
		id := string(srv.ID)
		m, ok := st.Member(id)
		if srv.Suffrage != raft.Voter || id == s.cfg.ID || !ok || m.APIAddress == "" {
			continue
		}
		if !s.peerHasRootKey(id, m.APIAddress) {
			continue
		}
		s.log.Warn("rootkms: leading without the root key; handing leadership to a voter that holds it", "to", id)
		if err := s.node.Raft.LeadershipTransferToServer(srv.ID, srv.Address).Error(); err != nil {
			s.log.Warn("rootkms: leadership hand-off failed; trying again later", "to", id, "err", err)
		}
		return
	}
	s.log.Warn("rootkms: leading without the root key, and no other voter holds it either; waiting for the distributors", "status", s.keyStatus.Load())
}

// peerHasRootKey asks voter id at addr whether it holds the root key.
func (s *Server) peerHasRootKey(id, addr string) bool {
	cc, err := s.peers.conn(s, id, addr)
	if err != nil {
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), clockQuorumTimeout)
	defer cancel()
	cs, err := rootkmsv1.NewRootKMSClient(cc).GetClusterStatus(ctx, &rootkmsv1.GetClusterStatusRequest{})
	return err == nil && cs.GetId() == id && cs.GetHasRootKey()
}
