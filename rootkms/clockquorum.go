package rootkms

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/identity"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
)

// The clock quorum. Steps judged on time (promote, disable, schedule
// destroy, destroy) are judged on the leader's clock alone: the Safety
// Condition compares it with the record's times, and the FSM compares
// destroy_after with the command time the leader stamps. checkClock catches
// a leader whose clock is behind the record, but a leader whose clock runs
// ahead finds nothing ahead of it, and would promote, retire or (worst,
// irreversibly, with no second check anywhere) destroy early. So before such
// a step the leader asks the other voters for their clocks
// (GetClusterStatus.now) and goes ahead only if its clock agrees with the
// median clock of a quorum of voters, within Safety.MaxClockSkew. A majority
// is needed because a majority is what decides everything else here: a
// minority of wrong clocks, the leader's or followers', cannot move the
// median past the correct ones.

// DefaultMaxClockSkew is Safety.MaxClockSkew unless set (or a quarter of the
// propagation window, if that is less). NTP keeps clocks within
// milliseconds of each other; two seconds is far above that and far above
// the error of the estimate (half a round trip, at most half of
// clockQuorumTimeout), so only a broken clock trips it, and far below the
// default window (10 minutes), the margin every time-judged step keeps.
const DefaultMaxClockSkew = 2 * time.Second

// clockQuorumTimeout bounds the leader's round of clock questions: a voter
// that does not answer in time does not count. It also bounds the error of
// an answer's offset (half its round trip).
const clockQuorumTimeout = time.Second

// peerClock is one voter's clock as the leader estimated it.
type peerClock struct {
	ID string
	// Offset is the voter's clock minus the leader's: its answer's now
	// minus the leader's clock half a round trip after sending.
	Offset time.Duration
}

// peerFailure is a voter that did not answer the clock question.
type peerFailure struct {
	ID, Why string
}

// clockVerdict is the decision on the clocks of a quorum. Median is the
// quorum's clock minus the leader's (the median of every offset, the
// leader's own 0 included); Agree reports whether the leader may judge a
// step on its clock.
type clockVerdict struct {
	Median time.Duration
	Agree  bool
	// Off lists, when the leader's clock agrees, the voters that answered
	// with a clock more than the bound from the quorum's (for the
	// operators: their NTP needs fixing, though a minority blocks nothing).
	Off []peerClock
}

// judgeClocks decides whether leader's clock agrees with a quorum of
// voters' (voters counts every voter, the leader included). It needs
// answers from enough voters that, with the leader, they are a majority;
// otherwise it refuses with Unavailable. It takes the median of the offsets
// (the leader's 0 included; of an even number, both middle ones must be
// within the bound, and Median is their mean). If the median is further
// than bound from 0 the leader's clock is wrong: FailedPrecondition naming
// by how much, who answered and what to fix. step names the refused step in
// the messages.
func judgeClocks(leader string, voters int, answers []peerClock, failures []peerFailure, bound time.Duration, step string) (clockVerdict, error) {
	majority := voters/2 + 1
	if len(answers)+1 < majority {
		why := make([]string, 0, len(failures))
		for _, f := range failures {
			why = append(why, f.ID+": "+f.Why)
		}
		return clockVerdict{}, status.Errorf(codes.Unavailable,
			"rootkms: cannot confirm the clock with a quorum: %s needs %d of %d voters (itself included) to report their clocks before %s, and only %d did (%s); nothing was proposed: retry once a majority of voters is reachable",
			leader, majority, voters, step, len(answers)+1, strings.Join(why, "; "))
	}
	all := append([]peerClock{{ID: leader}}, answers...)
	slices.SortFunc(all, func(a, b peerClock) int { return cmp.Or(cmp.Compare(a.Offset, b.Offset), strings.Compare(a.ID, b.ID)) })
	lo, hi := all[(len(all)-1)/2].Offset, all[len(all)/2].Offset
	v := clockVerdict{Median: lo + (hi-lo)/2, Agree: abs(lo) <= bound && abs(hi) <= bound}
	if v.Agree {
		for _, a := range answers {
			if abs(a.Offset-v.Median) > bound {
				v.Off = append(v.Off, peerClock{ID: a.ID, Offset: a.Offset - v.Median})
			}
		}
		return v, nil
	}
	dir := "ahead of"
	if v.Median > 0 {
		dir = "behind"
	}
	clocks := make([]string, len(all))
	for i, a := range all {
		clocks[i] = fmt.Sprintf("%s %s", a.ID, signed(a.Offset))
	}
	return v, status.Errorf(codes.FailedPrecondition,
		"rootkms: this leader's clock (%s) is %v %s the clock of a quorum of voters (offsets from it: %s; median %s), more than the %v allowed (max clock skew): %s is judged on the clock and is refused, nothing was proposed; fix NTP on %s, or move leadership to a voter whose clock agrees",
		leader, rounded(abs(v.Median)), dir, strings.Join(clocks, ", "), signed(v.Median), bound, step, leader)
}

func abs(d time.Duration) time.Duration {
	if d < 0 {
		return -d
	}
	return d
}

// rounded is d rounded for a message: to the second from ten seconds up
// (a round trip's error would only add noise), else to the millisecond.
func rounded(d time.Duration) time.Duration {
	if abs(d) >= 10*time.Second {
		return d.Round(time.Second)
	}
	return d.Round(time.Millisecond)
}

// signed formats d, rounded, with its sign.
func signed(d time.Duration) string {
	d = rounded(d)
	if d >= 0 {
		return "+" + d.String()
	}
	return d.String()
}

// peerConns caches one connection per other voter, as this replica's
// identity, for what a leader asks its peers (their clocks, whether they
// hold the root key), so a question costs one round trip, not a handshake. The zero value is
// ready; close ends every connection (Server.Close).
type peerConns struct {
	mu     sync.Mutex
	closed bool
	conns  map[string]*peerConn // by server ID
}

type peerConn struct {
	addr string
	cc   *grpc.ClientConn
}

// conn returns the connection to voter id at addr, dialling it (as this
// replica's identity, accepting only a root KMS replica as the server) if
// there is none or its address changed.
func (p *peerConns) conn(s *Server, id, addr string) (*grpc.ClientConn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, status.Error(codes.Unavailable, "rootkms: shutting down")
	}
	if c, ok := p.conns[id]; ok {
		if c.addr == addr {
			return c.cc, nil
		}
		c.cc.Close()
		delete(p.conns, id)
	}
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(identity.ClientCredentials(s.cfg.Source, s.cfg.Replicas.Authorize)),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.DefaultConfig, MinConnectTimeout: clockQuorumTimeout}))
	if err != nil {
		return nil, err
	}
	if p.conns == nil {
		p.conns = map[string]*peerConn{}
	}
	p.conns[id] = &peerConn{addr: addr, cc: cc}
	return cc, nil
}

// forget drops the connections of servers no longer among ids.
func (p *peerConns) forget(ids []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for id, c := range p.conns {
		if !slices.Contains(ids, id) {
			c.cc.Close()
			delete(p.conns, id)
		}
	}
}

func (p *peerConns) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	for id, c := range p.conns {
		c.cc.Close()
		delete(p.conns, id)
	}
}

// checkClockQuorum refuses a step judged on time unless this leader's
// clock agrees with a quorum of voters' (see judgeClocks). It asks every
// other voter of the Raft configuration, at the API address the state
// records for it, at once, and waits until the verdict is settled (see
// collectClocks), at most clockQuorumTimeout. A voter
// whose clock is off the quorum's is logged (a minority does not block).
func (s *Server) checkClockQuorum(ctx context.Context, step string) error {
	f := s.node.Raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return status.Errorf(codes.Unavailable, "rootkms: cannot confirm the clock with a quorum: reading the raft configuration: %v; nothing was proposed, retry", err)
	}
	var peers []raft.Server
	voters := 0
	for _, srv := range f.Configuration().Servers {
		if srv.Suffrage != raft.Voter {
			continue
		}
		voters++
		if string(srv.ID) != s.cfg.ID {
			peers = append(peers, srv)
		}
	}
	if !slices.ContainsFunc(f.Configuration().Servers, func(srv raft.Server) bool { return string(srv.ID) == s.cfg.ID && srv.Suffrage == raft.Voter }) {
		voters++ // a leader counts itself, whatever the configuration says
	}
	ids := make([]string, len(peers))
	for i, p := range peers {
		ids[i] = string(p.ID)
	}
	s.peers.forget(ids)

	ctx, cancel := context.WithTimeout(ctx, clockQuorumTimeout)
	defer cancel() // ends the questions still out once collectClocks is done
	out := make(chan clockAnswer, len(peers))
	st := s.fsm.State()
	for _, p := range peers {
		id := string(p.ID)
		m, ok := st.Member(id)
		if !ok || m.APIAddress == "" {
			out <- clockAnswer{bad: &peerFailure{ID: id, Why: "no API address registered"}}
			continue
		}
		go func() {
			c, err := s.peerClock(ctx, id, m.APIAddress)
			if err != nil {
				out <- clockAnswer{bad: &peerFailure{ID: id, Why: err.Error()}}
				return
			}
			out <- clockAnswer{ok: c}
		}()
	}
	answers, failures := collectClocks(out, len(peers), voters, s.cfg.Safety.MaxClockSkew)
	v, err := judgeClocks(s.cfg.ID, voters, answers, failures, s.cfg.Safety.MaxClockSkew, step)
	for _, off := range v.Off {
		s.log.Warn("rootkms: a voter's clock disagrees with the quorum's; fix NTP on it",
			"voter", off.ID, "offset_from_quorum", signed(off.Offset), "max_clock_skew", s.cfg.Safety.MaxClockSkew)
	}
	if err != nil {
		s.log.Warn("rootkms: refused a step judged on time: the clocks disagree or cannot be confirmed", "step", step, "err", status.Convert(err).Message())
	}
	return err
}

// clockAnswer is one voter's answer to the clock question: its clock, or
// why it gave none.
type clockAnswer struct {
	ok  peerClock
	bad *peerFailure
}

// collectClocks reads the answers of peers voters from out (every sender
// answers before its question's deadline) and returns as soon as the
// verdict is settled: every peer answered, or a majority of voters (the
// leader, offset 0, included) answered within bound of the leader's clock.
// With a majority within bound, whatever the others answer, at most a
// minority lies on either side of the bound, so both middle offsets of
// every voter's clock lie within it and judgeClocks agrees. A paused or
// partitioned voter then costs no wait, where waiting for it would hold
// every write behind the step for the whole clockQuorumTimeout.
func collectClocks(out <-chan clockAnswer, peers, voters int, bound time.Duration) ([]peerClock, []peerFailure) {
	var answers []peerClock
	var failures []peerFailure
	within := 1 // the leader's own clock
	for range peers {
		if within >= voters/2+1 {
			break
		}
		a := <-out
		if a.bad != nil {
			failures = append(failures, *a.bad)
			continue
		}
		answers = append(answers, a.ok)
		if abs(a.ok.Offset) <= bound {
			within++
		}
	}
	return answers, failures
}

// peerClock asks voter id at addr for its clock and estimates its offset
// from this replica's: its now minus this clock half the round trip after
// sending (the round trip measured on the monotonic clock).
func (s *Server) peerClock(ctx context.Context, id, addr string) (peerClock, error) {
	cc, err := s.peers.conn(s, id, addr)
	if err != nil {
		return peerClock{}, err
	}
	sent, start := s.cfg.Now(), time.Now()
	cs, err := rootkmsv1.NewRootKMSClient(cc).GetClusterStatus(ctx, &rootkmsv1.GetClusterStatusRequest{})
	rtt := time.Since(start)
	switch {
	case err != nil:
		return peerClock{}, fmt.Errorf("no answer at %s: %s", addr, status.Convert(err).Message())
	case cs.GetId() != id:
		return peerClock{}, fmt.Errorf("%s answered as %q", addr, cs.GetId())
	case cs.GetNow() == nil || cs.GetNow().CheckValid() != nil:
		return peerClock{}, fmt.Errorf("%s reported no clock (an older version?)", addr)
	}
	return peerClock{ID: id, Offset: cs.GetNow().AsTime().Sub(sent.Add(rtt / 2))}, nil
}
