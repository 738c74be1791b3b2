package kmsclient

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
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
)

func (o op) String() string {
	if o == opEncrypt {
		return "encrypt"
	}
	return "decrypt"
}

// attemptFunc makes one RPC on one endpoint.
type attemptFunc func(ctx context.Context, kms kmsv1.KMSClient) error

// retryable reports whether a failed attempt may be retried on the next
// endpoint. The caller has already checked that the call's own context is
// not done, so a DeadlineExceeded here is an attempt's (or the server's).
func retryable(err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.ResourceExhausted, codes.DeadlineExceeded:
		return true
	}
	return false
}

// maxRetryHint bounds a server's retry hint: a misbehaving server must not
// stall a client longer than its own backoff would.
const maxRetryHint = 30 * time.Second

// retryDelay is the retry hint of a failure: the delay of its
// google.rpc.RetryInfo detail (0 if none), at most maxRetryHint.
func retryDelay(err error) time.Duration {
	st, ok := status.FromError(err)
	if !ok {
		return 0
	}
	for _, d := range st.Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok && ri.GetRetryDelay().IsValid() {
			return min(max(ri.GetRetryDelay().AsDuration(), 0), maxRetryHint)
		}
	}
	return 0
}

// call runs one Encrypt or Decrypt: attempts on the region's endpoints,
// starting at the one in use, then, for a decrypt, on those of its fallback
// regions. One round tries each endpoint once with no pause between
// endpoints; a backoff with full jitter separates rounds. It stops at the
// first success, the first non-retryable error, when the context is done, or
// when every region's attempt budget is spent.
func (c *Client) call(ctx context.Context, o op, r *region, keyset string, f attemptFunc) error {
	if c.closed.Load() {
		return ErrClosed
	}
	regions := r.decryptOrder[:1]
	if o == opDecrypt {
		regions = r.decryptOrder
	}
	if err := ctx.Err(); err != nil {
		return c.stopped(ctx, o, r, keyset, regions, callState{})
	}
	callCtx, cancel := context.WithTimeout(ctx, c.opts.timeout)
	defer cancel()

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
				timeout := c.opts.attemptTimeout
				more := n > 1 && budget[i] > 0 // another endpoint of this region, now or next round
				for _, b := range budget[i+1:] {
					more = more || b > 0 // a fallback region
				}
				if more {
					if dl, ok := callCtx.Deadline(); ok {
						timeout = min(timeout, time.Until(dl)/2)
					}
				}
				err := c.attempt(callCtx, ep, timeout, f)
				if err == nil {
					return nil
				}
				if callCtx.Err() != nil {
					// The caller's context or the call's deadline ended
					// the attempt: this is not the endpoint's fault.
					return c.stopped(ctx, o, r, keyset, regions, st)
				}
				if errors.Is(err, ErrClosed) {
					return ErrClosed
				}
				if !retryable(err) && i > 0 {
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
				if !retryable(err) {
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
			return c.exhausted(o, r, keyset, regions, st)
		}
		// A server's retry hint (RetryInfo, sent with RESOURCE_EXHAUSTED
		// by an overloaded or over-quota KMS) is the pause's floor; a hint
		// past the call's deadline ends the call now with that answer.
		pause := max(fullJitter(backoffCeiling(c.opts.retry, round)), st.retryAfter)
		if dl, ok := callCtx.Deadline(); ok && st.retryAfter > 0 && time.Until(dl) < pause {
			return c.exhausted(o, r, keyset, regions, st)
		}
		st.retryAfter = 0
		if err := c.sleep(callCtx, pause); err != nil {
			return c.stopped(ctx, o, r, keyset, regions, st)
		}
	}
}

// attempt makes one RPC on ep, bounded by timeout.
func (c *Client) attempt(callCtx context.Context, ep *endpoint, timeout time.Duration, f attemptFunc) error {
	kc, err := c.kmsClient(ep)
	if err != nil {
		return err
	}
	actx, cancel := context.WithTimeout(callCtx, timeout)
	defer cancel()
	return f(actx, kc)
}

// failed moves the region off ep if ep is still the endpoint in use (a
// concurrent call may have moved it already; it must move once, not once per
// failed call).
func (c *Client) failed(ep *endpoint, err error) {
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
	tried    []*endpoint
	last     error // the last retryable failure of an endpoint
	lastEP   *endpoint
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
	for _, t := range s.tried {
		if t == ep {
			return
		}
	}
	s.tried = append(s.tried, ep)
}

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
func (c *Client) exhausted(o op, r *region, keyset string, regions []*region, st callState) error {
	return fmt.Errorf("kmsclient: %s with keyset %q in %s: every attempt failed (%d attempts on %d of %d endpoints%s); last error from %s: %w",
		o, keyset, where(r, regions), st.attempts, len(st.tried), countEndpoints(regions), st.fallbackSummary(), st.lastEP.addr, st.last)
}

// stopped is the error of a call ended by its context: canceled by the
// caller, or past its deadline (the caller's or WithTimeout's). A
// cancellation reports codes.Canceled. A deadline reports the last
// endpoint failure's code if there was one, else DeadlineExceeded; either
// way errors.Is(err, context.DeadlineExceeded) holds.
func (c *Client) stopped(ctx context.Context, o op, r *region, keyset string, regions []*region, st callState) error {
	prefix := fmt.Sprintf("kmsclient: %s with keyset %q in %s", o, keyset, where(r, regions))
	after := fmt.Sprintf("after %d attempts on %d of %d endpoints%s", st.attempts, len(st.tried), countEndpoints(regions), st.fallbackSummary())
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
