package kms

import (
	"cmp"
	"context"
	"fmt"
	"maps"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/internal/identity"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
)

// Quota is one caller's limits on one server's data plane (kms.v1.KMS and
// the transit API), as a bundle's bundlev1.Quota carries them. A zero field
// sets no limit of its kind.
type Quota struct {
	// RequestsPerSecond is the sustained rate of calls (a batch is one
	// call).
	RequestsPerSecond uint32
	// Burst is how many calls may come at once above that rate (the token
	// bucket's depth); 0 means RequestsPerSecond.
	Burst uint32
	// MaxConcurrent bounds the caller's calls in progress at once.
	MaxConcurrent uint32
}

func (q Quota) validate() error {
	if q.Burst > 0 && q.RequestsPerSecond == 0 {
		return fmt.Errorf("burst %d without requests_per_second", q.Burst)
	}
	return nil
}

// burst is the bucket's depth: Burst, or one second's worth.
func (q Quota) burst() uint32 { return cmp.Or(q.Burst, q.RequestsPerSecond) }

func (q Quota) String() string {
	var parts []string
	if q.RequestsPerSecond > 0 {
		parts = append(parts, fmt.Sprintf("%d requests/s, burst %d", q.RequestsPerSecond, q.burst()))
	}
	if q.MaxConcurrent > 0 {
		parts = append(parts, fmt.Sprintf("%d calls at once", q.MaxConcurrent))
	}
	if len(parts) == 0 {
		return "no limit"
	}
	return strings.Join(parts, ", ")
}

func quotaOf(q *bundlev1.Quota) Quota {
	return Quota{RequestsPerSecond: q.GetRequestsPerSecond(), Burst: q.GetBurst(), MaxConcurrent: q.GetMaxConcurrent()}
}

// quotaRule is a Quota ready for the request path.
type quotaRule struct {
	pattern identity.Pattern // zero for the default
	// desc names the rule in refusals and audit records.
	desc string
	// interval is the time one call costs at the sustained rate, in
	// nanoseconds (0: no rate limit); window is burst × interval: how far
	// ahead of now a caller's bucket may run.
	interval, window int64
	maxConc          int32 // 0: no limit
}

func newRule(q Quota, pattern identity.Pattern, name string) *quotaRule {
	r := &quotaRule{pattern: pattern, desc: fmt.Sprintf("quota %s: %s", name, q)}
	if q.RequestsPerSecond > 0 {
		r.interval = int64(time.Second) / int64(q.RequestsPerSecond)
		r.window = r.interval * int64(q.burst())
	}
	if q.MaxConcurrent > 0 {
		r.maxConc = int32(min(q.MaxConcurrent, 1<<30))
	}
	return r
}

// quotaSet is the quotas in force: the served bundle's, first match wins,
// and the default. Immutable.
type quotaSet struct {
	rules []*quotaRule
	def   *quotaRule
	// key is a canonical form: a swap to a bundle with the same quotas
	// keeps every caller's state.
	key string
}

// newQuotaSet builds the quotas of b (nil: none), with def as the default
// when b sets none.
func newQuotaSet(b *bundlev1.Bundle, def Quota) (*quotaSet, error) {
	qs := &quotaSet{}
	var key strings.Builder
	if len(b.GetQuotas()) > 0 {
		td, err := bundle.TrustDomain(b)
		if err != nil {
			return nil, fmt.Errorf("%w: quotas: %v", errInvalid, err)
		}
		for i, q := range b.GetQuotas() {
			p, err := identity.ParsePattern(q.GetPattern(), td)
			if err != nil {
				return nil, fmt.Errorf("%w: quota %d: %v", errInvalid, i, err)
			}
			qs.rules = append(qs.rules, newRule(quotaOf(q), p, fmt.Sprintf("%q", q.GetPattern())))
			fmt.Fprintf(&key, "%s %v;", p, quotaOf(q))
		}
	}
	name := "default (server)"
	if d := b.GetDefaultQuota(); d != nil {
		def, name = quotaOf(d), "default (bundle)"
	}
	qs.def = newRule(def, identity.Pattern{}, name)
	fmt.Fprintf(&key, "default %v", def)
	qs.key = key.String()
	return qs, nil
}

func (qs *quotaSet) ruleFor(id identity.ID) *quotaRule {
	for _, r := range qs.rules {
		if r.pattern.Match(id) {
			return r
		}
	}
	return qs.def
}

// shedKind is why a call was refused before its handler ran.
type shedKind int

const (
	shedRate        shedKind = iota // over its quota's rate
	shedConcurrency                 // over its quota's calls at once
	shedOverload                    // over the server's MaxInFlight
	shedSize                        // request over MaxDataMsgSize
	shedItems                       // batch of more items than MaxBatch
	numShed
)

var shedNames = [numShed]string{"quota_rate", "quota_concurrency", "overload", "message_size", "batch_items"}

// caller is one caller's admission state. Its rule never changes: new
// quotas make new callers.
type caller struct {
	id   string
	rule *quotaRule
	// tat is the bucket's theoretical arrival time (GCRA), in nanoseconds
	// since the admission's epoch: a call is admitted if, after it, tat is
	// at most rule.window ahead of now.
	tat      atomic.Int64
	inflight atomic.Int32
	// seen is when the caller last called (epoch nanoseconds, updated at
	// most once a second), for eviction.
	seen atomic.Int64
	// refused counts the refusals since the last audit record, by kind.
	refused [numShed]atomic.Uint64
}

// callerTable maps caller IDs to their state. Immutable but for the
// callers' atomics: a new caller copies it (callers are few and long-lived:
// workloads with SVIDs), so the request path reads it without a lock.
type callerTable struct {
	quotas  *quotaSet
	callers map[string]*caller
}

// maxCallers bounds a callerTable; callers past it share one state under
// the default quota.
const maxCallers = 1 << 16

// busyRetry is the retry hint of a refusal for calls in progress (the
// caller's or the server's): a data-plane call takes about a millisecond.
const busyRetry = 10 * time.Millisecond

// admission decides, before a data-plane call's request is read, whether
// the server takes it: the caller's quota (rate and calls at once), then
// the server's cap on calls in progress. In the common case it is a map
// read of an immutable table, a few atomics and no allocation.
type admission struct {
	epoch time.Time
	// clock, if set, replaces time since epoch (tests).
	clock       func() time.Duration
	maxInFlight int64
	inflight    atomic.Int64
	table       atomic.Pointer[callerTable]
	// overflow is the shared state of callers past maxCallers.
	overflow atomic.Pointer[caller]
	shed     *[numShed]counter // cairn_kms_shed_total's children

	mu sync.Mutex // serialises table changes
	// retired are callers of replaced tables with refusals not yet audited.
	retired []*caller
}

func newAdmission(maxInFlight int, def Quota, shed *[numShed]counter) *admission {
	a := &admission{epoch: time.Now(), maxInFlight: int64(maxInFlight), shed: shed}
	qs, _ := newQuotaSet(nil, def) // no patterns to parse: cannot fail
	a.table.Store(&callerTable{quotas: qs, callers: map[string]*caller{}})
	a.overflow.Store(&caller{id: "(callers past the table's limit)", rule: qs.def})
	return a
}

// setQuotas puts qs in force. Callers keep their state if the quotas did
// not change; otherwise every caller starts afresh (a full bucket).
func (a *admission) setQuotas(qs *quotaSet) {
	a.mu.Lock()
	defer a.mu.Unlock()
	old := a.table.Load()
	if old.quotas.key == qs.key {
		return
	}
	for _, c := range old.callers {
		a.retired = append(a.retired, c)
	}
	a.retired = append(a.retired, a.overflow.Load())
	a.table.Store(&callerTable{quotas: qs, callers: map[string]*caller{}})
	a.overflow.Store(&caller{id: "(callers past the table's limit)", rule: qs.def})
}

func (a *admission) now() int64 {
	if a.clock != nil {
		return int64(a.clock())
	}
	return int64(time.Since(a.epoch))
}

// caller returns id's state, adding it if new.
func (a *admission) caller(id identity.ID) *caller {
	if c, ok := a.table.Load().callers[id.String()]; ok {
		return c
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	t := a.table.Load()
	if c, ok := t.callers[id.String()]; ok {
		return c
	}
	if len(t.callers) >= maxCallers {
		return a.overflow.Load()
	}
	c := &caller{id: id.String(), rule: t.quotas.ruleFor(id)}
	c.seen.Store(a.now())
	next := &callerTable{quotas: t.quotas, callers: make(map[string]*caller, len(t.callers)+1)}
	maps.Copy(next.callers, t.callers)
	next.callers[c.id] = c
	a.table.Store(next)
	return c
}

// admit admits a call of id, or refuses it with RESOURCE_EXHAUSTED and a
// retry hint. An admitted call must be released.
func (a *admission) admit(id identity.ID) (*caller, error) {
	c := a.caller(id)
	r := c.rule
	now := a.now()
	if seen := c.seen.Load(); now-seen > int64(time.Second) {
		c.seen.Store(now)
	}
	if n := c.inflight.Add(1); r.maxConc > 0 && n > r.maxConc {
		c.inflight.Add(-1)
		return nil, a.refuse(c, shedConcurrency, busyRetry, fmt.Sprintf("%d calls in progress", r.maxConc))
	}
	if r.interval > 0 {
		for {
			tat := c.tat.Load()
			next := max(tat, now) + r.interval
			if over := next - now - r.window; over > 0 {
				c.inflight.Add(-1)
				return nil, a.refuse(c, shedRate, time.Duration(over), "over its rate")
			}
			if c.tat.CompareAndSwap(tat, next) {
				break
			}
		}
	}
	if a.inflight.Add(1) > a.maxInFlight {
		a.inflight.Add(-1)
		c.inflight.Add(-1)
		if r.interval > 0 {
			c.tat.Add(-r.interval) // the call was not served: give its token back
		}
		c.refused[shedOverload].Add(1)
		a.shed[shedOverload].Inc()
		return nil, retryError(fmt.Sprintf("kms: server overloaded: %d data-plane calls in progress, its limit; call shed", a.maxInFlight), busyRetry)
	}
	return c, nil
}

// refuseUnadmitted counts a refusal of id's call before its admission (its
// request was over a data-plane limit: see gated).
func (a *admission) refuseUnadmitted(id identity.ID, kind shedKind) {
	c := a.caller(id)
	c.refused[kind].Add(1)
	a.shed[kind].Inc()
}

// release ends an admitted call.
func (a *admission) release(c *caller) {
	c.inflight.Add(-1)
	a.inflight.Add(-1)
}

// refuse counts a refusal of c and returns its error.
func (a *admission) refuse(c *caller, kind shedKind, retry time.Duration, what string) error {
	c.refused[kind].Add(1)
	a.shed[kind].Inc()
	return retryError(fmt.Sprintf("kms: %s is over its %s on this server (%s)", c.id, c.rule.desc, what), retry)
}

// retryError is a RESOURCE_EXHAUSTED status whose message ends with the
// retry delay and which carries it as a google.rpc.RetryInfo detail.
func retryError(msg string, retry time.Duration) error {
	retry = max(retry.Round(time.Millisecond), time.Millisecond)
	st := status.New(codes.ResourceExhausted, fmt.Sprintf("%s; retry after %v", msg, retry))
	if d, err := st.WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(retry)}); err == nil {
		st = d
	}
	return st.Err()
}

// quotaOperation is the operation of the audit records of refusals.
const quotaOperation = kmsService + "*"

// refusals are one caller's refusal counts taken for an audit record.
type refusals struct {
	id     string
	desc   string
	counts [numShed]uint64
}

// take takes (and zeroes) the refusal counts of every caller, and drops
// callers idle since before idleBefore (epoch nanoseconds).
func (a *admission) take(idleBefore int64) []refusals {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []refusals
	collect := func(c *caller) bool {
		r := refusals{id: c.id, desc: c.rule.desc}
		var total uint64
		for k := range r.counts {
			r.counts[k] = c.refused[k].Swap(0)
			total += r.counts[k]
		}
		if total > 0 {
			out = append(out, r)
		}
		return total > 0
	}
	for _, c := range a.retired {
		collect(c)
	}
	a.retired = nil
	collect(a.overflow.Load())
	t := a.table.Load()
	var idle []string
	for id, c := range t.callers {
		if !collect(c) && c.inflight.Load() == 0 && c.seen.Load() < idleBefore {
			idle = append(idle, id)
		}
	}
	if len(idle) > 0 {
		next := &callerTable{quotas: t.quotas, callers: maps.Clone(t.callers)}
		for _, id := range idle {
			delete(next.callers, id)
		}
		a.table.Store(next)
	}
	return out
}

// auditRefusalsLoop writes the refusals' audit records every
// QuotaAuditWindow until Close (which writes them once more).
func (s *Server) auditRefusalsLoop() {
	t := time.NewTicker(s.cfg.QuotaAuditWindow)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
			s.auditRefusals()
		}
	}
}

// auditRefusals writes one audit record per caller refused since the last
// call, with the counts by reason.
func (s *Server) auditRefusals() {
	s.refusalMu.Lock()
	defer s.refusalMu.Unlock()
	now := time.Now()
	from := s.refusalsFrom
	s.refusalsFrom = now
	idleBefore := s.adm.now() - 2*int64(s.cfg.QuotaAuditWindow) - int64(time.Second)
	for _, r := range s.adm.take(idleBefore) {
		var total uint64
		var parts []string
		for k, n := range r.counts {
			total += n
			if n > 0 {
				parts = append(parts, fmt.Sprintf("%s %d", shedNames[k], n))
			}
		}
		rec := audit.Record{
			Time: now, Identity: r.id, Operation: quotaOperation,
			Target:  audit.Target{Region: s.cfg.Region},
			Outcome: audit.OutcomeDenied, Code: codes.ResourceExhausted.String(),
			Reason: fmt.Sprintf("%d data-plane calls refused from %s to %s (%s); %s",
				total, from.UTC().Format(time.RFC3339Nano), now.UTC().Format(time.RFC3339Nano), strings.Join(parts, ", "), r.desc),
		}
		if err := s.cfg.Audit.Write(context.Background(), rec); err != nil {
			s.log.Error("kms: auditing quota refusals", "identity", r.id, "refused", total, "err", err)
		}
	}
}
