package tests

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
	"github.com/cairnkms/cairn/tests/framework"
)

// opTimeout bounds one client operation, redirects and retries included:
// enough for two attempts on a replica that does not answer and one that
// does (see attemptTimeout).
const opTimeout = 5 * time.Second

// load is a steady mix of region writes and linearizable reads from several
// clients, each bounded in time and in count. Every client operation
// (attempts and redirects together, one request ID) is recorded in the
// history as one operation, and in done.
type load struct {
	h      *framework.History
	start  time.Time
	wg     sync.WaitGroup
	cancel context.CancelFunc

	mu   sync.Mutex
	done []loadOp
}

// loadOp is one finished client operation.
type loadOp struct {
	client     int
	start, end time.Time
	write      bool
	// ok: it succeeded; answered: it got an answer that says what happened
	// (success, AlreadyExists, NotFound), not a failure.
	ok, answered bool
	err          error
}

// loadRate is each load client's pace, in operations per second: a steady
// load well above the 50 ops/s the tests require in all, that leaves the
// two cores enough room that Raft's 300ms timeouts measure the faults the
// tests inject, not CPU starvation.
const loadRate = 50

// startLoad starts one goroutine per client. Each runs at loadRate until d
// has passed or it has done maxOps operations, on regions picked at random
// from regions: 20% CreateRegion, 40% RotateRegionKey, 40% GetRegion.
// Client i is client i in the history. If the test ends first (it failed),
// the load is cut short and waited for.
func startLoad(t *testing.T, h *framework.History, clients []*rootkmsclient.Client, regions []string, d time.Duration, maxOps int) *load {
	ctx, cancel := context.WithCancel(context.Background())
	l := &load{h: h, start: time.Now(), cancel: cancel}
	t.Cleanup(func() { l.cancel(); l.wait() })
	for i, c := range clients {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), uint64(i)))
			for n := 0; n < maxOps && time.Since(l.start) < d && ctx.Err() == nil; n++ {
				// The n-th operation is due at n/loadRate; one that is late
				// (a fault held the client) starts at once.
				sleepUntil(l.start.Add(time.Duration(n) * time.Second / loadRate))
				in := framework.RegionInput{Region: regions[rng.IntN(len(regions))]}
				switch p := rng.IntN(10); {
				case p < 2:
					in.Op = framework.OpCreate
				case p < 6:
					in.Op = framework.OpRotate
				default:
					in.Op = framework.OpGet
				}
				began := time.Now()
				opCtx, cancel := context.WithTimeout(ctx, opTimeout)
				reply, err := recordedDo(opCtx, c, h, i, in)
				cancel()
				l.mu.Lock()
				answered := framework.Classify(in.Op, reply, err).Outcome != framework.OutcomeUnknown
				l.done = append(l.done, loadOp{client: i, start: began, end: time.Now(), write: in.Op != framework.OpGet, ok: err == nil, answered: answered, err: err})
				l.mu.Unlock()
			}
		}()
	}
	return l
}

// wait waits for every client to finish (each stops by itself within the
// load's duration plus one opTimeout).
func (l *load) wait() { l.wg.Wait() }

// rate returns how many operations per second finished in [from, to), and
// how many of those were answered (not failed).
func (l *load) rate(from, to time.Time) (total, answered float64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	secs := to.Sub(from).Seconds()
	for _, op := range l.done {
		if !op.end.Before(from) && op.end.Before(to) {
			total++
			if op.answered {
				answered++
			}
		}
	}
	return total / secs, answered / secs
}

// count returns how many operations finished, and how many were answered.
func (l *load) count() (total, answered int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, op := range l.done {
		total++
		if op.answered {
			answered++
		}
	}
	return total, answered
}

// firstOKWrite returns, for each client that had one, when its first
// successful write called after t finished.
func (l *load) firstOKWrite(after time.Time) map[int]time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := map[int]time.Time{}
	for _, op := range l.done {
		if op.write && op.ok && op.start.After(after) {
			if first, ok := out[op.client]; !ok || op.end.Before(first) {
				out[op.client] = op.end
			}
		}
	}
	return out
}

// summary describes what each client did after t: how many operations it
// finished, how many writes succeeded, and its last error.
func (l *load) summary(after time.Time) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	type sum struct {
		ops, okWrites int
		lastErr       error
		lastEnd       time.Time
	}
	per := map[int]*sum{}
	maxClient := -1
	for _, op := range l.done {
		if !op.start.After(after) {
			continue
		}
		s := per[op.client]
		if s == nil {
			s = &sum{}
			per[op.client] = s
		}
		maxClient = max(maxClient, op.client)
		s.ops++
		if op.write && op.ok {
			s.okWrites++
		}
		if op.err != nil {
			s.lastErr = op.err
		}
		s.lastEnd = op.end
	}
	var b strings.Builder
	for c := 0; c <= maxClient; c++ {
		if s := per[c]; s != nil {
			fmt.Fprintf(&b, "\nclient %d: %d operations, %d writes succeeded, last finished %s after; last error: %v",
				c, s.ops, s.okWrites, s.lastEnd.Sub(after).Round(time.Millisecond), s.lastErr)
		}
	}
	return b.String()
}

// waitOKWrites waits until n clients have each had a write called after t
// succeed, or until timeout; it returns the earliest such write's end, and
// whether n clients got there.
func (l *load) waitOKWrites(after time.Time, n int, timeout time.Duration) (time.Time, bool) {
	deadline := time.Now().Add(timeout)
	for {
		firsts := l.firstOKWrite(after)
		if len(firsts) >= n {
			var first time.Time
			for _, t := range firsts {
				if first.IsZero() || t.Before(first) {
					first = t
				}
			}
			return first, true
		}
		if time.Now().After(deadline) {
			return time.Time{}, false
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// sleepUntil waits until t: it schedules a fault at a point of the load,
// it is not a wait for a condition.
func sleepUntil(t time.Time) {
	if d := time.Until(t); d > 0 {
		time.Sleep(d)
	}
}

// The open-loop load of TestRootKMSLeaderKillUnderLoad.
const (
	// openLoadRate is the load offered, in operations per second across all
	// callers: the n-th operation is issued at n/openLoadRate after the
	// start whether or not the earlier ones have returned.
	openLoadRate = 150
	// openLoadSlots bounds the operations in flight. Each in-flight
	// operation holds one slot, which is also its client number in the
	// history (so that one client's operations never overlap). It is far
	// above what a failover holds up (openLoadRate for a few seconds), so
	// that slow calls do not throttle the offered rate; if every slot is
	// taken the next operation waits for one, and is counted as issued
	// late.
	openLoadSlots = 512
	// openLateAfter is how late an operation may be issued before it is
	// counted as late (reported, not asserted: a loaded machine schedules
	// goroutines late).
	openLateAfter = 50 * time.Millisecond
)

// openLoad is what an open-loop load adds to load: the offered count, how
// many were issued, late and in flight.
type openLoad struct {
	*load
	offered int
	// issued counts the operations started; late those started more than
	// openLateAfter after their time; maxLate the latest.
	issued, late atomic.Int64
	maxLate      atomic.Int64
	// inFlightWrites counts the writes called and not yet returned;
	// maxInFlight the most operations in flight at once.
	inFlightWrites, inFlight, maxInFlight atomic.Int64
}

// keysetLoad is the keyset side of the open-loop load: the keysets it
// creates and updates, the regions they are served in, and the highest
// revision seen of each (updates that name an expected revision use it).
type keysetLoad struct {
	names, regions []string
	mu             sync.Mutex
	seen           map[string]uint64
}

func (k *keysetLoad) saw(name string, rev uint64) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.seen[name] = max(k.seen[name], rev)
}

func (k *keysetLoad) lastSeen(name string) uint64 {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.seen[name]
}

// startOpenLoad offers rate*d operations at rate per second, open loop (see
// openLoadRate), through clients in turn, on regions and keysets picked at
// random: 10% CreateRegion, 20% RotateRegionKey, 15% GetRegion, 5%
// CreateKeyset, 15% UpdateKeyset ADD_VERSION, 10% UpdateKeyset REWRAP
// (half of the updates at the last revision seen of that keyset, half at
// any revision) and 25% GetKeyset. Every operation is recorded in h and in
// the load's done list, under its slot's client number. If the test ends
// first (it failed), no more are issued and those in flight are cut short.
func startOpenLoad(t *testing.T, h *framework.History, clients []*rootkmsclient.Client, regions []string, ks *keysetLoad, rate int, d time.Duration) *openLoad {
	ctx, cancel := context.WithCancel(context.Background())
	o := &openLoad{load: &load{h: h, start: time.Now(), cancel: cancel}, offered: int(int64(rate) * int64(d) / int64(time.Second))}
	t.Cleanup(func() { o.cancel(); o.wait() })
	slots := make(chan int, openLoadSlots)
	for i := range openLoadSlots {
		slots <- i
	}
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 150))
	o.wg.Add(1)
	go func() {
		defer o.wg.Done()
		var calls sync.WaitGroup
		defer calls.Wait()
		for n := 0; n < o.offered && ctx.Err() == nil; n++ {
			due := o.start.Add(time.Duration(n) * time.Second / time.Duration(rate))
			sleepUntil(due)
			var slot int
			select {
			case slot = <-slots:
			case <-ctx.Done():
				return
			}
			if late := time.Since(due); late > openLateAfter {
				o.late.Add(1)
				if int64(late) > o.maxLate.Load() {
					o.maxLate.Store(int64(late))
				}
			}
			p := rng.IntN(100)
			c := clients[n%len(clients)]
			var in framework.RegionInput
			var kin framework.KeysetInput
			keyset := p >= 45
			if keyset {
				kin = ks.pick(rng, p)
			} else {
				in = framework.RegionInput{Region: regions[rng.IntN(len(regions))]}
				switch {
				case p < 10:
					in.Op = framework.OpCreate
				case p < 30:
					in.Op = framework.OpRotate
				default:
					in.Op = framework.OpGet
				}
			}
			write := keyset && kin.Op != framework.KeysetGet || !keyset && in.Op != framework.OpGet
			o.issued.Add(1)
			if now := o.inFlight.Add(1); now > o.maxInFlight.Load() {
				o.maxInFlight.Store(now)
			}
			calls.Add(1)
			go func() {
				defer calls.Done()
				defer func() { slots <- slot }()
				// A write is counted in flight from after its start to before
				// its end, as recorded: a count seen at t is of writes that
				// inFlightAt(t) counts too.
				began := time.Now()
				if write {
					o.inFlightWrites.Add(1)
				}
				opCtx, cancel := context.WithTimeout(ctx, opTimeout)
				var err error
				var answered bool
				if keyset {
					var reply *rootkmsv1.Keyset
					reply, err = recordedKeysetDo(opCtx, c, h, slot, kin, ks.regions)
					answered = framework.ClassifyKeyset(kin, reply, err).Outcome != framework.OutcomeUnknown
					if err == nil {
						ks.saw(kin.Keyset, reply.GetRecord().GetRevision())
					}
				} else {
					var reply *rootkmsv1.Region
					reply, err = recordedDo(opCtx, c, h, slot, in)
					answered = framework.Classify(in.Op, reply, err).Outcome != framework.OutcomeUnknown
				}
				cancel()
				if write {
					o.inFlightWrites.Add(-1)
				}
				o.inFlight.Add(-1)
				ended := time.Now()
				o.mu.Lock()
				o.done = append(o.done, loadOp{client: slot, start: began, end: ended, write: write, ok: err == nil, answered: answered, err: err})
				o.mu.Unlock()
			}()
		}
	}()
	return o
}

// pick chooses a keyset operation for p in [45, 100) (see startOpenLoad).
func (k *keysetLoad) pick(rng *rand.Rand, p int) framework.KeysetInput {
	in := framework.KeysetInput{Keyset: k.names[rng.IntN(len(k.names))]}
	switch {
	case p < 50:
		in.Op = framework.KeysetCreate
	case p < 65:
		in.Op = framework.KeysetAddVersion
	case p < 75:
		in.Op = framework.KeysetRewrap
	default:
		in.Op = framework.KeysetGet
	}
	if (in.Op == framework.KeysetAddVersion || in.Op == framework.KeysetRewrap) && rng.IntN(2) == 0 {
		in.ExpectedRevision = k.lastSeen(in.Keyset)
	}
	return in
}

// inFlightAt counts the operations (and the writes among them) called
// before at that returned after it.
func (l *load) inFlightAt(at time.Time) (ops, writes int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, op := range l.done {
		if op.start.Before(at) && op.end.After(at) {
			ops++
			if op.write {
				writes++
			}
		}
	}
	return ops, writes
}

// keysetTTL is the ciphertext TTL of the load's keysets.
const keysetTTL = 24 * time.Hour

// recordedKeysetDo does one keyset operation through the cluster client
// and records it in h, as recordedDo does for regions.
func recordedKeysetDo(ctx context.Context, c *rootkmsclient.Client, h *framework.History, client int, in framework.KeysetInput, regions []string) (*rootkmsv1.Keyset, error) {
	call := h.BeginKeyset(client, in)
	ctx = rootkmsclient.WithRequestID(ctx, call.RequestID())
	var reply *rootkmsv1.Keyset
	err := c.Do(ctx, func(ctx context.Context, rc rootkmsv1.RootKMSClient) error {
		call.Attempt()
		actx, cancel := context.WithTimeout(ctx, attemptTimeout)
		defer cancel()
		var err error
		switch in.Op {
		case framework.KeysetCreate:
			reply, err = rc.CreateKeyset(actx, &rootkmsv1.CreateKeysetRequest{Name: in.Keyset, Regions: regions, CiphertextTtl: durationpb.New(keysetTTL)})
		case framework.KeysetAddVersion:
			reply, err = rc.UpdateKeyset(actx, &rootkmsv1.UpdateKeysetRequest{Name: in.Keyset, ExpectedRevision: in.ExpectedRevision, Step: statev1.KeysetStep_KEYSET_STEP_ADD_VERSION})
		case framework.KeysetRewrap:
			reply, err = rc.UpdateKeyset(actx, &rootkmsv1.UpdateKeysetRequest{Name: in.Keyset, ExpectedRevision: in.ExpectedRevision, Step: statev1.KeysetStep_KEYSET_STEP_REWRAP})
		case framework.KeysetGet:
			reply, err = rc.GetKeyset(actx, &rootkmsv1.GetKeysetRequest{Name: in.Keyset})
		}
		if err != nil && ctx.Err() == nil && actx.Err() != nil {
			return status.Errorf(codes.Unavailable, "attempt timed out after %s: %v", attemptTimeout, err)
		}
		return err
	})
	if err != nil {
		reply = nil
	}
	call.End(reply, err)
	return reply, err
}
