// Package rootkmsclient calls a root KMS cluster: it follows a follower's
// redirect to the leader, tries the next replica when one is unreachable or
// the outcome of an attempt is unknown, and remembers the leader. It is apart
// from package rootkms so that its users (regional KMS servers, regionctl) do
// not link the Raft replica.
//
// Retrying writes is safe because every call of Do carries one request ID
// (gRPC metadata RequestIDHeader) on all its attempts, and the root KMS
// applies a write at most once per caller identity and request ID: the retry
// of a write that was applied gets the answer of a successful write (the
// record as it is now), not a second application.
package rootkmsclient

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
)

// The error contract of the root KMS API: a write sent to a follower fails
// with FAILED_PRECONDITION carrying an ErrorInfo of ErrorDomain and
// ReasonNotLeader, whose metadata names the leader's API address under
// LeaderAddressKey (when known); an error after which a write may or may not
// have been applied carries ReasonOutcomeUnknown: retrying it with the same
// request ID (RequestIDHeader) is safe, the write is applied at most once.
const (
	ErrorDomain          = "cairn.rootkms.v1"
	ReasonNotLeader      = "NOT_LEADER"
	ReasonOutcomeUnknown = "OUTCOME_UNKNOWN"
	LeaderAddressKey     = "leader_api_address"
)

// Client calls a root KMS cluster. It follows a follower's redirect to the
// leader, tries the next replica when one is unreachable, and remembers the
// leader for the next call. Safe for concurrent use.
type Client struct {
	creds credentials.TransportCredentials
	addrs []string

	// electionWait is ElectionWait, attemptTimeout AttemptTimeout and
	// connectTimeout ConnectTimeout (tests change them).
	electionWait, attemptTimeout, connectTimeout time.Duration

	mu     sync.Mutex
	conns  map[string]*grpc.ClientConn
	leader string
}

// maxHops bounds redirects and retries within one Do (waits for an
// election, bounded by ElectionWait, do not count).
const maxHops = 6

// ElectionWait bounds how long one Do waits, polling, for a cluster that
// knows no leader (an election in progress) before it returns the
// NOT_LEADER error.
const ElectionWait = 5 * time.Second

// AttemptTimeout bounds one attempt against one replica, so a dead or paused
// leader costs at most this much before the next replica is tried. The
// attempt it cuts short may still be applied by the server: its retry carries
// the same request ID, so it is not applied twice.
const AttemptTimeout = 3 * time.Second

// ConnectTimeout bounds connecting to one replica (TCP and the TLS
// handshake): a replica on a host that is down or cut off answers nothing,
// and the call moves on to the next replica after this rather than after
// the whole AttemptTimeout. Replicas are milliseconds apart; a handshake
// takes two round trips.
const ConnectTimeout = time.Second

// ConnectMaxDelay caps gRPC's reconnect backoff to a replica (its default
// grows to 120 s): a KMS server that retried through a long root KMS outage
// would otherwise go on failing for up to two minutes after the replicas
// were back. Do also resets a replica's backoff when an attempt on it fails
// Unavailable, so the next attempt reconnects at once.
const ConnectMaxDelay = 5 * time.Second

// RequestIDHeader is the gRPC metadata key of a call's request ID (the audit
// log's: audit.RequestIDHeader). The root KMS records it in the Raft command
// of a write and applies a write at most once per caller identity and
// request ID.
const RequestIDHeader = audit.RequestIDHeader

// MaxRequestIDLen bounds a request ID. A request ID is 1 to MaxRequestIDLen
// characters of [A-Za-z0-9-_.:]; the server replaces any other by one of its
// own, which makes a retry unrecognisable.
const MaxRequestIDLen = 64

// WithRequestID returns a context whose calls through Do carry id as their
// request ID on every attempt, instead of one Do makes up. Pin one when the
// same logical write may be sent by several Do calls (a controller that
// resumes after a crash, a test that records the ID): the root KMS applies it
// at most once. id must be valid (see MaxRequestIDLen); the same id for a
// different write makes the second one answer as a retry of the first.
func WithRequestID(ctx context.Context, id string) context.Context {
	md, _ := metadata.FromOutgoingContext(ctx)
	md = md.Copy()
	md.Set(RequestIDHeader, id)
	return metadata.NewOutgoingContext(ctx, md)
}

// RequestIDFrom returns the request ID ctx carries in its outgoing metadata
// (set by WithRequestID or by Do), or "".
func RequestIDFrom(ctx context.Context) string {
	md, _ := metadata.FromOutgoingContext(ctx)
	if v := md.Get(RequestIDHeader); len(v) > 0 {
		return v[len(v)-1]
	}
	return ""
}

// NewRequestID returns a fresh random request ID (32 hex digits).
func NewRequestID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+)
	return hex.EncodeToString(b[:])
}

// NewClient returns a client that dials the given API addresses with src's
// identity, accepting only root KMS replicas as servers.
func New(src *identity.Source, addrs []string) *Client {
	replicas, _ := identity.ParseAllowlist(src.TrustDomain(), "rootkms/*/*")
	return &Client{creds: identity.ClientCredentials(src, replicas.Authorize), addrs: addrs, conns: map[string]*grpc.ClientConn{},
		electionWait: ElectionWait, attemptTimeout: AttemptTimeout, connectTimeout: ConnectTimeout}
}

// connectBackoff is gRPC's default reconnect backoff capped at
// ConnectMaxDelay.
var connectBackoff = func() backoff.Config {
	b := backoff.DefaultConfig
	b.MaxDelay = ConnectMaxDelay
	return b
}()

func (c *Client) conn(addr string) (*grpc.ClientConn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cc, ok := c.conns[addr]; ok {
		return cc, nil
	}
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(c.creds),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: connectBackoff, MinConnectTimeout: c.connectTimeout}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxMessageSize), grpc.MaxCallSendMsgSize(MaxMessageSize)))
	if err != nil {
		return nil, err
	}
	c.conns[addr] = cc
	return cc, nil
}

// MaxMessageSize bounds a message to or from the root KMS (its server takes
// requests up to the same size): a usage observation of a large region, or
// the keyset records with their copies.
const MaxMessageSize = 16 << 20

// Do runs call against the cluster: first the last known leader, then each
// configured replica, following NOT_LEADER redirects. It returns call's last
// error if no replica could serve it.
//
// Every attempt carries the same request ID (RequestIDHeader in the outgoing
// metadata of the context call gets): the caller's, if ctx already carries
// one (WithRequestID), otherwise a new one per Do. That makes an attempt of
// unknown outcome safe to retry: one cut short by AttemptTimeout, a transport
// failure after the request may have been sent, or an OUTCOME_UNKNOWN answer.
// Do retries those (within ctx, maxHops and ElectionWait), and a write that
// the server had applied is not applied again. call must make one RPC with
// the context it is given, and must not set the request ID itself.
func (c *Client) Do(ctx context.Context, call func(context.Context, rootkmsv1.RootKMSClient) error) error {
	if RequestIDFrom(ctx) == "" {
		ctx = WithRequestID(ctx, NewRequestID())
	}
	c.mu.Lock()
	order := append([]string(nil), c.addrs...)
	if c.leader != "" {
		// The remembered leader first, and once: a leader cut off from
		// the cluster would otherwise cost two attempts per pass.
		order = append([]string{c.leader}, slices.DeleteFunc(order, func(a string) bool { return a == c.leader })...)
	}
	c.mu.Unlock()
	var lastErr error
	tried := map[string]bool{}
	var electionDeadline time.Time // set at the first "no leader known"
	for hop := 0; hop < maxHops && len(order) > 0; hop++ {
		addr := order[0]
		order = order[1:]
		cc, err := c.conn(addr)
		if err != nil {
			lastErr = err
			continue
		}
		actx, cancel := context.WithTimeout(ctx, c.attemptTimeout)
		err = call(actx, rootkmsv1.NewRootKMSClient(cc))
		cancel()
		if err == nil {
			c.mu.Lock()
			c.leader = addr
			c.mu.Unlock()
			return nil
		}
		lastErr = err
		if ctx.Err() != nil {
			return err
		}
		st := status.Convert(err)
		code := st.Code()
		if hasReason(st, ReasonOutcomeUnknown) {
			code = codes.Unavailable // whatever its code: retried as below
		}
		if code != codes.FailedPrecondition {
			c.forgetLeader(addr)
		}
		if status.Code(err) == codes.Unavailable {
			// The replica may be back before gRPC's backoff would try it
			// again: the next attempt on it reconnects at once.
			cc.ResetConnectBackoff()
		}
		switch code {
		case codes.FailedPrecondition:
			leader := leaderFrom(st)
			if leader == "" {
				if !isNotLeader(st) {
					return err // a real precondition failure, not a redirect
				}
				// No leader known yet (an election): wait a moment and
				// ask again, for up to ElectionWait; the wait is not a hop.
				if electionDeadline.IsZero() {
					electionDeadline = time.Now().Add(c.electionWait)
				}
				if time.Now().After(electionDeadline) || !sleepCtx(ctx, 100*time.Millisecond) {
					return err
				}
				order = requeue(order, addr, c.addrs, tried)
				hop--
				continue
			}
			if !tried[leader] || leader != addr {
				order = append([]string{leader}, order...)
			}
		case codes.Unavailable, codes.DeadlineExceeded:
			// The replica is unreachable, the attempt ran out of
			// AttemptTimeout, or the outcome is unknown (OUTCOME_UNKNOWN
			// is Unavailable): the write may have been applied, and the
			// retry, with the same request ID, is not applied again.
			tried[addr] = true
			if len(order) == 0 {
				// Every replica failed once: back off, go around again.
				if !sleepCtx(ctx, 100*time.Millisecond) {
					return err
				}
				order = append(order, c.addrs...)
			}
		default:
			return err
		}
	}
	if lastErr == nil {
		lastErr = errors.New("rootkms: no replica addresses")
	}
	return fmt.Errorf("rootkms: no replica could serve the call: %w", lastErr)
}

// requeue puts addr, which knows no leader, back at the end of order unless
// it is queued, then every configured replica that is neither queued nor
// found unreachable in this call. While Do waits out an election it must go
// on asking the replicas it followed a redirect from: one that redirected to
// a leader that has since gone (a stale leader) may be the next leader.
// Without this, only the replicas that know no leader would be asked again
// until ElectionWait ran out; a replica that will never know one (removed
// from the cluster without learning it) would hold the call for all of it.
func requeue(order []string, addr string, addrs []string, unreachable map[string]bool) []string {
	if !slices.Contains(order, addr) {
		order = append(order, addr)
	}
	for _, a := range addrs {
		if !unreachable[a] && !slices.Contains(order, a) {
			order = append(order, a)
		}
	}
	return order
}

func isNotLeader(st *status.Status) bool { return hasReason(st, ReasonNotLeader) }

func hasReason(st *status.Status, reason string) bool {
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok && info.GetReason() == reason && info.GetDomain() == ErrorDomain {
			return true
		}
	}
	return false
}

// forgetLeader drops addr as the remembered leader after it failed.
func (c *Client) forgetLeader(addr string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.leader == addr {
		c.leader = ""
	}
}

// leaderFrom extracts the leader's API address from a NOT_LEADER error.
func leaderFrom(st *status.Status) string {
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok && info.GetReason() == ReasonNotLeader {
			return info.GetMetadata()[LeaderAddressKey]
		}
	}
	return ""
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// Close closes every connection.
func (c *Client) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, cc := range c.conns {
		cc.Close()
	}
	c.conns = map[string]*grpc.ClientConn{}
}
