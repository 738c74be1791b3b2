package kmsclient

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// op is a data-plane operation.
type op int

const (
	opEncrypt op = iota
	opDecrypt
	opEncryptBatch
	opDecryptBatch
	opGenerateDataKey
)

func (o op) String() string {
	switch o {
	case opEncrypt:
		return "encrypt"
	case opDecrypt:
		return "decrypt"
	case opEncryptBatch:
		return "encrypt batch"
	case opDecryptBatch:
		return "decrypt batch"
	default:
		return "generate data key"
	}
}

// fallsBack reports whether the operation may go on in the region's decrypt
// fallbacks: only decryption does; whatever encrypts stays in its region.
func (o op) fallsBack() bool { return o == opDecrypt || o == opDecryptBatch }

// batch reports whether the operation is a batch.
func (o op) batch() bool { return o == opEncryptBatch || o == opDecryptBatch }

// attemptFunc makes one RPC on one endpoint of region reg (the call's own
// region, or for a decrypt one of its fallbacks).
type attemptFunc func(ctx context.Context, kms kmsv1.KMSClient, reg *region) error

// retryable reports whether a failed attempt of o may be retried on the next
// endpoint. The caller has already checked that the call's own context is
// not done, so a DeadlineExceeded here is an attempt's (or the server's).
//
// A batch is retried only when its attempt brought no answer: a batch that
// was answered is final, whatever its items say. Among the unanswered, a
// ResourceExhausted is retried only with the KMS's retry hint (admission
// control and quotas refuse before reading the request); without one it is
// a gRPC message-size limit, of the server's or of the client's, which the
// same batch will hit again.
func retryable(o op, err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded:
		return true
	case codes.ResourceExhausted:
		return !o.batch() || hasRetryInfo(err)
	}
	return false
}

// maxRetryHint bounds a server's retry hint: a misbehaving server must not
// stall a client longer than its own backoff would.
const maxRetryHint = 30 * time.Second

// retryDelay is the retry hint of a failure: the delay of its
// google.rpc.RetryInfo detail (0 if none), at most maxRetryHint.
func retryDelay(err error) time.Duration {
	ri := retryInfo(err)
	if ri == nil {
		return 0
	}
	return min(max(ri.GetRetryDelay().AsDuration(), 0), maxRetryHint)
}

// hasRetryInfo reports whether a failure carries a retry hint.
func hasRetryInfo(err error) bool { return retryInfo(err) != nil }

// retryInfo returns the valid google.rpc.RetryInfo detail of a failure, if
// any.
func retryInfo(err error) *errdetails.RetryInfo {
	st, ok := status.FromError(err)
	if !ok {
		return nil
	}
	for _, d := range st.Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok && ri.GetRetryDelay().IsValid() {
			return ri
		}
	}
	return nil
}

// call runs one data-plane call: attempts on the region's endpoints,
// starting at the one in use, then, for a decrypt, on those of its fallback
// regions. One round tries each endpoint once with no pause between
// endpoints; a backoff with full jitter separates rounds. It stops at the
// first success, the first non-retryable error, when the context is done, or
// when every region's attempt budget is spent.
//
// The call's deadline is the caller's or WithTimeout's, whichever is
// earlier. Each attempt runs under one context derived from the caller's,
// bounded by that deadline and the attempt's own timeout (or under the
// caller's context itself when that is already bounded so), and a context
// for the call as a whole is made only to pause between rounds: a call that
// succeeds at once makes at most one context.
func (c *Client) call(ctx context.Context, o op, r *region, keyset string, f attemptFunc) error {
	if c.closed.Load() {
		return ErrClosed
	}
	regions := r.decryptOrder[:1]
	if o.fallsBack() {
		regions = r.decryptOrder
	}
	if err := ctx.Err(); err != nil {
		return c.stopped(ctx, o, r, keyset, regions, &callState{})
	}
	deadline := time.Now().Add(c.opts.timeout)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}

	var st callState
	var budgetBuf [4]int // no allocation for up to three fallbacks
	budget := budgetBuf[:0]
	for range regions {
		budget = append(budget, c.opts.retry.MaxAttempts)
	}
	for round := 0; ; round++ {
		for i, reg := range regions {
			n := len(reg.endpoints)
			start := int(reg.cur.Load())
			for k := 0; k < n && budget[i] > 0; k++ {
				if i > 0 && k == 0 {
					level := slog.LevelDebug
					if logNow(&reg.fallbackLogged) {
						level = slog.LevelWarn
					}
					c.log.Log(ctx, level, "kmsclient: decrypting in a fallback region", "region", r.name, "fallback", reg.name, "keyset", keyset)
				}
				ep := reg.endpoints[(start+k)%n]
				budget[i]--
				st.attempts++
				st.addTried(ep)
				// With another endpoint left to try, an attempt may use at
				// most half the time left: a hung endpoint must not take a
				// short call's whole deadline and never be failed over.
				now := time.Now()
				timeout := c.opts.attemptTimeout
				more := n > 1 && budget[i] > 0 // another endpoint of this region, now or next round
				for _, b := range budget[i+1:] {
					more = more || b > 0 // a fallback region
				}
				if more {
					timeout = min(timeout, deadline.Sub(now)/2)
				}
				attemptDeadline := now.Add(timeout)
				byCall := !attemptDeadline.Before(deadline) // the call's deadline bounds this attempt
				if byCall {
					attemptDeadline = deadline
				}
				// The connection's service config bounds every attempt by
				// the attempt timeout (kmsClient): an attempt bounded by it
				// and nothing shorter needs no context of its own.
				byConfig := !byCall && timeout == c.opts.attemptTimeout
				err := c.attempt(ctx, ep, reg, attemptDeadline, byConfig, f)
				if err == nil {
					return nil
				}
				if ctx.Err() != nil || !time.Now().Before(deadline) ||
					(byCall && status.Code(err) == codes.DeadlineExceeded) {
					// The caller's context or the call's deadline ended
					// the attempt: this is not the endpoint's fault.
					return c.stopped(ctx, o, r, keyset, regions, &st)
				}
				if errors.Is(err, ErrClosed) {
					return ErrClosed
				}
				if !retryable(o, err) && i > 0 {
					// A fallback region that cannot help (the keyset is not
					// there, this client may not use it there) says nothing
					// about the ciphertext: the call's answer stays the
					// primary region's outage, and the next fallback is
					// tried.
					st.fallbackFailures = append(st.fallbackFailures, fmt.Sprintf("%s: %s", reg.name, status.Code(err)))
					c.log.Debug("kmsclient: decrypt fallback region refused", "region", r.name, "fallback", reg.name, "endpoint", ep.addr, "err", err)
					budget[i] = 0
					break
				}
				if !retryable(o, err) {
					return fmt.Errorf("kmsclient: %s with keyset %q in region %s (endpoint %s): %w",
						o, keyset, reg.name, ep.addr, err)
				}
				st.last, st.lastEP = err, ep
				st.retryAfter = max(st.retryAfter, retryDelay(err))
				c.failed(ep, err)
			}
		}
		spent := true
		for _, b := range budget {
			spent = spent && b == 0
		}
		if spent {
			return c.exhausted(o, r, keyset, regions, &st)
		}
		// A server's retry hint (RetryInfo, sent with RESOURCE_EXHAUSTED
		// by an overloaded or over-quota KMS) is the pause's floor; a hint
		// past the call's deadline ends the call now with that answer.
		pause := max(fullJitter(backoffCeiling(c.opts.retry, round)), st.retryAfter)
		if st.retryAfter > 0 && time.Until(deadline) < pause {
			return c.exhausted(o, r, keyset, regions, &st)
		}
		st.retryAfter = 0
		if err := c.pause(ctx, deadline, pause); err != nil {
			return c.stopped(ctx, o, r, keyset, regions, &st)
		}
	}
}

// pause sleeps d between rounds, or until ctx is done or deadline passes.
func (c *Client) pause(ctx context.Context, deadline time.Time, d time.Duration) error {
	sctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	return c.sleep(sctx, d)
}

// attempt makes one RPC on ep, of region reg, bounded by deadline. With
// byConfig, deadline is the attempt timeout from now, which the
// connection's service config puts on the RPC's own context: gRPC makes
// one context per call whatever it is given, and this spares a second.
func (c *Client) attempt(ctx context.Context, ep *endpoint, reg *region, deadline time.Time, byConfig bool, f attemptFunc) error {
	kc, err := c.kmsClient(ep)
	if err != nil {
		return err
	}
	if byConfig {
		return f(ctx, kc, reg)
	}
	if dl, ok := ctx.Deadline(); ok && !dl.After(deadline) {
		return f(ctx, kc, reg) // the caller's context is bounded so already
	}
	actx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	return f(actx, kc, reg)
}

// failed moves the region off ep if ep is still the endpoint in use (a
// concurrent call may have moved it already; it must move once, not once per
// failed call).
//
// An Unavailable endpoint may only be between connection attempts: gRPC
// waits out a growing backoff (up to connectMaxDelay) before it reconnects,
// and meanwhile fails every call at once, so a call's whole attempt budget
// could be spent in a few milliseconds on a server that is back. The failure
// resets that backoff: the next attempt on the endpoint reconnects at once
// (one connection attempt at a time, so a dead server sees no storm).
func (c *Client) failed(ep *endpoint, err error) {
	if status.Code(err) == codes.Unavailable {
		if cc := ep.cc.Load(); cc != nil {
			cc.ResetConnectBackoff()
		}
	}
	r := ep.region
	n := len(r.endpoints)
	next := (ep.index + 1) % n
	if n > 1 && r.cur.CompareAndSwap(int32(ep.index), int32(next)) && logNow(&ep.failoverLogged) {
		c.log.Warn("kmsclient: endpoint failed; failing over",
			"region", r.name, "from", ep.addr, "to", r.endpoints[next].addr, "code", status.Code(err).String(), "err", err)
		return
	}
	c.log.Debug("kmsclient: attempt failed", "region", r.name, "endpoint", ep.addr, "code", status.Code(err).String(), "err", err)
}

// warnInterval bounds how often one endpoint's failover, or one region's
// fallback, is logged as a warning: with a whole region down every call
// fails over, and the log must not grow with the call rate.
const warnInterval = 10 * time.Second

// logNow reports whether a warning last logged at *at (unix nanoseconds) may
// be logged again now, and if so records now.
func logNow(at *atomic.Int64) bool {
	now := time.Now().UnixNano()
	prev := at.Load()
	return (prev == 0 || now-prev >= int64(warnInterval)) && at.CompareAndSwap(prev, now)
}

// callState is what one call saw, for its error.
type callState struct {
	attempts int
	// tried are the distinct endpoints tried: the first few in place, so
	// that a call that succeeds at once allocates nothing for them.
	tried      [4]*endpoint
	triedN     int
	triedExtra []*endpoint
	last       error // the last retryable failure of an endpoint
	lastEP     *endpoint
	// retryAfter is the longest retry hint (RetryInfo) of the round's
	// failures.
	retryAfter time.Duration
	// fallbackFailures are the fallback regions that answered with a
	// non-retryable error ("eu-west: NotFound").
	fallbackFailures []string
}

// fallbackSummary adds the fallback regions' refusals to an error message.
func (s *callState) fallbackSummary() string {
	if len(s.fallbackFailures) == 0 {
		return ""
	}
	return "; fallback regions refused: " + strings.Join(s.fallbackFailures, ", ")
}

func (s *callState) addTried(ep *endpoint) {
	if slices.Contains(s.tried[:s.triedN], ep) || slices.Contains(s.triedExtra, ep) {
		return
	}
	if s.triedN < len(s.tried) {
		s.tried[s.triedN] = ep
		s.triedN++
		return
	}
	s.triedExtra = append(s.triedExtra, ep)
}

// triedCount is the number of distinct endpoints tried.
func (s *callState) triedCount() int { return s.triedN + len(s.triedExtra) }

// where names the regions of a call for its error.
func where(r *region, regions []*region) string {
	if len(regions) == 1 {
		return "region " + r.name
	}
	names := make([]string, 0, len(regions)-1)
	for _, f := range regions[1:] {
		names = append(names, f.name)
	}
	return fmt.Sprintf("region %s and its decrypt fallbacks %s", r.name, strings.Join(names, ", "))
}

func countEndpoints(regions []*region) int {
	n := 0
	for _, r := range regions {
		n += len(r.endpoints)
	}
	return n
}

// exhausted is the error of a call whose every attempt failed retryably. It
// wraps the last gRPC status, so status.Code reports that status's code.
func (c *Client) exhausted(o op, r *region, keyset string, regions []*region, st *callState) error {
	return fmt.Errorf("kmsclient: %s with keyset %q in %s: every attempt failed (%d attempts on %d of %d endpoints%s); last error from %s: %w",
		o, keyset, where(r, regions), st.attempts, st.triedCount(), countEndpoints(regions), st.fallbackSummary(), st.lastEP.addr, st.last)
}

// stopped is the error of a call ended by its context: canceled by the
// caller, or past its deadline (the caller's or WithTimeout's). A
// cancellation reports codes.Canceled. A deadline reports the last
// endpoint failure's code if there was one, else DeadlineExceeded; either
// way errors.Is(err, context.DeadlineExceeded) holds.
func (c *Client) stopped(ctx context.Context, o op, r *region, keyset string, regions []*region, st *callState) error {
	prefix := fmt.Sprintf("kmsclient: %s with keyset %q in %s", o, keyset, where(r, regions))
	after := fmt.Sprintf("after %d attempts on %d of %d endpoints%s", st.attempts, st.triedCount(), countEndpoints(regions), st.fallbackSummary())
	if err := ctx.Err(); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		if st.last != nil {
			return fmt.Errorf("%s: %w %s (last error from %s: %v)", prefix, contextError{err}, after, st.lastEP.addr, st.last)
		}
		return fmt.Errorf("%s: %w %s", prefix, contextError{err}, after)
	}
	if st.last != nil {
		return fmt.Errorf("%s: %w %s; last error from %s: %w", prefix, context.DeadlineExceeded, after, st.lastEP.addr, st.last)
	}
	return fmt.Errorf("%s: %w %s", prefix, contextError{context.DeadlineExceeded}, after)
}

// contextError is a context's error that is also a gRPC status (Canceled or
// DeadlineExceeded), so that both errors.Is and status.Code work on it.
type contextError struct{ err error }

func (e contextError) Error() string              { return e.err.Error() }
func (e contextError) Unwrap() error              { return e.err }
func (e contextError) GRPCStatus() *status.Status { return status.FromContextError(e.err) }

// backoffCeiling is the upper bound of the pause after failed round round
// (0-based): InitialBackoff doubled round times, capped at MaxBackoff.
func backoffCeiling(p RetryPolicy, round int) time.Duration {
	d := p.InitialBackoff
	for i := 0; i < round && d < p.MaxBackoff; i++ {
		d *= 2
	}
	return min(d, p.MaxBackoff)
}

// fullJitter returns a duration drawn uniformly from [0, ceiling).
func fullJitter(ceiling time.Duration) time.Duration {
	if ceiling <= 0 {
		return 0
	}
	return time.Duration(randUint64() % uint64(ceiling))
}

// randIntN returns a number drawn uniformly from [0, n), n > 0.
func randIntN(n int) int { return int(randUint64() % uint64(n)) }

func randUint64() uint64 {
	var b [8]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+)
	return binary.LittleEndian.Uint64(b[:])
}

// sleepContext waits d or until ctx is done, and returns ctx's error then.
func sleepContext(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
