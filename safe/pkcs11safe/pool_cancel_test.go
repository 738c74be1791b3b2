package pkcs11safe

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/safe/pkcs11safe/softhsmtest"
)

// cancelWhileHeld is the context key of the cancel function that hookHeld
// calls once the operation holding the context has its session.
type cancelWhileHeld struct{}

// TestPoolCancelWhileHolding (RELIABILITY row 7): 100 goroutines share a pool
// of 4 sessions; half of them are cancelled while they hold a session (from
// hookHeld, so the cancel lands after the session is taken and before the
// operation runs). Every cancelled Seal returns context.Canceled and stores
// nothing; every other call succeeds. Afterwards nothing has kept a session:
// all 4 are taken at once under a short deadline (a leaked session would make
// the fourth acquire wait out the deadline), they are 4 distinct live
// sessions, and the token counts exactly those 4 plus the Safe's login
// anchor. The whole run is bounded, so a deadlock fails the test rather
// than hanging it.
func TestPoolCancelWhileHolding(t *testing.T) {
	const (
		goroutines = 100
		poolCap    = 4
	)
	env := softhsmtest.New(t)
	env.InitToken("cancel-pool", soPIN, userPIN)
	cfg := config(t, env, "cancel-pool")
	cfg.MaxSessions = poolCap
	bg := context.Background()
	s, err := Open(bg, cfg)
	if err != nil {
		t.Fatalf("Open = %v", err)
	}
	// Close takes every session back, so with one lost it would wait
	// forever: the test then fails without closing.
	sessionLost := false
	t.Cleanup(func() {
		if sessionLost {
			t.Errorf("not closing the safe: a session never came back to the pool, and Close would wait for it forever")
			return
		}
		if err := s.Close(); err != nil {
			t.Errorf("Close = %v", err)
		}
	})

	var heldCancels sync.Map // goroutine number -> true, once its hook ran
	s.hookHeld = func(ctx context.Context) {
		if c, ok := ctx.Value(cancelWhileHeld{}).(func()); ok {
			c()
		}
	}

	type outcome struct {
		g         uint32
		cancelled bool
		err       error
	}
	// Every call is bounded: if a cancelled call kept its session, the
	// others fail with DeadlineExceeded instead of waiting forever.
	runCtx, cancelRun := context.WithTimeout(bg, 60*time.Second)
	defer cancelRun()
	results := make(chan outcome, goroutines)
	var wg sync.WaitGroup
	for g := range uint32(goroutines) {
		wg.Go(func() {
			r := ref(7, g+1)
			if g%2 == 0 {
				ctx, cancel := context.WithCancel(runCtx)
				defer cancel()
				ctx = context.WithValue(ctx, cancelWhileHeld{}, func() {
					heldCancels.Store(g, true)
					cancel()
				})
				results <- outcome{g, true, s.Seal(ctx, r, shareFor(r))}
				return
			}
			err := s.Seal(runCtx, r, shareFor(r))
			if err == nil {
				share, uerr := s.Unseal(runCtx, r)
				switch {
				case uerr != nil:
					err = uerr
				case !share.Equal(shareFor(r)):
					err = fmt.Errorf("Unseal(%v) returned another share", r)
				}
				share.Wipe()
			}
			results <- outcome{g, false, err}
		})
	}
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(3 * time.Minute):
		t.Fatalf("%d goroutines on a pool of %d did not finish in 3 minutes: deadlock", goroutines, poolCap)
	}
	close(results)

	cancelled := 0
	for o := range results {
		switch {
		case o.cancelled:
			cancelled++
			if !errors.Is(o.err, context.Canceled) {
				t.Errorf("goroutine %d: Seal cancelled while holding a session = %v, want context.Canceled", o.g, o.err)
			}
			if _, ok := heldCancels.Load(o.g); !ok {
				t.Errorf("goroutine %d: cancelled before it held a session; the hook never ran for it", o.g)
			}
		case o.err != nil:
			t.Errorf("goroutine %d: %v", o.g, o.err)
		}
	}
	if cancelled != goroutines/2 {
		t.Errorf("%d goroutines cancelled, want %d", cancelled, goroutines/2)
	}
	s.hookHeld = nil

	// A cancelled Seal stored nothing; the others stored their share.
	lctx, cancelList := context.WithTimeout(bg, 30*time.Second)
	defer cancelList()
	refs, err := s.List(lctx)
	if err != nil || len(refs) != goroutines/2 {
		t.Errorf("List() = %d refs, %v; want %d (only the uncancelled Seals)", len(refs), err, goroutines/2)
	}
	for _, r := range refs {
		if (r.Index-1)%2 == 0 {
			t.Errorf("List() has %v, sealed by a goroutine cancelled before its Seal could store", r)
		}
	}

	// Every session came back: all poolCap are taken at once under a
	// short deadline.
	dctx, cancel := context.WithTimeout(bg, 5*time.Second)
	defer cancel()
	var held []pkcs11.SessionHandle
	defer func() {
		for _, sh := range held {
			s.pool.release(sh, nil)
		}
	}()
	for i := range poolCap {
		sh, err := s.pool.acquire(dctx)
		if err != nil {
			sessionLost = true
			t.Fatalf("acquiring session %d of %d after the run = %v; a cancelled call kept its session", i+1, poolCap, err)
		}
		held = append(held, sh)
	}
	distinct := map[pkcs11.SessionHandle]bool{}
	for _, sh := range held {
		if sh == noSession {
			t.Errorf("pool handed out the empty slot marker")
			continue
		}
		if _, err := s.mod.ctx.GetSessionInfo(sh); err != nil {
			t.Errorf("GetSessionInfo(pooled session %d) = %v, want a live session", sh, err)
		}
		distinct[sh] = true
	}
	if len(distinct) != poolCap {
		t.Errorf("pool sessions %v: %d distinct, want %d", held, len(distinct), poolCap)
	}
	// A fifth acquire must wait: the pool never grows past its cap.
	short, cancelShort := context.WithTimeout(bg, 20*time.Millisecond)
	defer cancelShort()
	if sh, err := s.pool.acquire(short); !errors.Is(err, context.DeadlineExceeded) {
		if err == nil {
			s.pool.release(sh, nil)
		}
		t.Errorf("acquire with all %d sessions held = %v, want context.DeadlineExceeded", poolCap, err)
	}
	// Nothing leaked beside them: the live sessions of this process on the
	// token are the pool's and the login anchor. SoftHSM2 reports its
	// session count as CK_UNAVAILABLE_INFORMATION, so probe the handles
	// instead: it numbers sessions from 1 and reuses closed numbers, so
	// every live one is below the number ever open at once.
	live := 0
	for h := pkcs11.SessionHandle(1); h <= 4*goroutines; h++ {
		if si, err := s.mod.ctx.GetSessionInfo(h); err == nil && si.SlotID == s.slot {
			live++
		}
	}
	if live != poolCap+1 {
		t.Errorf("live sessions on the token = %d, want %d: the pool's %d and the login anchor", live, poolCap+1, poolCap)
	}
	if info, err := s.mod.ctx.GetTokenInfo(s.slot); err != nil {
		t.Errorf("GetTokenInfo = %v", err)
	} else if info.SessionCount != pkcs11.CK_UNAVAILABLE_INFORMATION && info.SessionCount != poolCap+1 {
		t.Errorf("token session count = %d, want %d", info.SessionCount, poolCap+1)
	}
	// And a normal operation still runs once they are back.
	for _, sh := range held {
		s.pool.release(sh, nil)
	}
	held = nil
	r := ref(7, 2)
	if got, err := s.Unseal(bg, r); err != nil || !got.Equal(shareFor(r)) {
		t.Errorf("Unseal(%v) after the run = %v", r, err)
	}
	if _, err := s.Unseal(bg, ref(7, 1)); !errors.Is(err, safe.ErrNotFound) {
		t.Errorf("Unseal(%v), whose Seal was cancelled = %v, want ErrNotFound", ref(7, 1), err)
	}
}
