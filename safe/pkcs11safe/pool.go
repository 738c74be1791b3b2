package pkcs11safe

import (
	"context"
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"

	"github.com/cairnkms/cairn/safe"
)

// noSession marks a pool slot whose session is to be opened on first use
// (CK_INVALID_HANDLE is 0 in PKCS#11).
const noSession pkcs11.SessionHandle = 0

// pool is a bounded set of R/W sessions on one token. A PKCS#11 session runs
// one operation at a time (PKCS#11 2.40 §5.6), so an operation takes a
// session out of the pool for its whole duration. The pool holds exactly
// size slots: a slot is a live session or noSession (opened lazily, and what
// a broken session is replaced by if reopening it fails), so capacity is never
// lost and waiters cannot starve on a shrunk pool.
type pool struct {
	ctx  *pkcs11.Ctx
	slot uint
	free chan pkcs11.SessionHandle
	done <-chan struct{} // closed when the Safe starts closing
}

func newPool(ctx *pkcs11.Ctx, slot uint, size int, done <-chan struct{}) *pool {
	p := &pool{ctx: ctx, slot: slot, free: make(chan pkcs11.SessionHandle, size), done: done}
	for range size {
		p.free <- noSession
	}
	return p
}

// acquire takes a session, waiting for one while ctx allows. It returns
// ctx's error (wrapped) if ctx ends first and safe.ErrClosed if the Safe
// starts closing first.
func (p *pool) acquire(ctx context.Context) (pkcs11.SessionHandle, error) {
	var sh pkcs11.SessionHandle
	select {
	case sh = <-p.free:
	case <-ctx.Done():
		return noSession, fmt.Errorf("waiting for a session: %w", ctx.Err())
	case <-p.done:
		return noSession, safe.ErrClosed
	}
	if sh != noSession {
		return sh, nil
	}
	sh, err := p.ctx.OpenSession(p.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		p.free <- noSession
		return noSession, fmt.Errorf("C_OpenSession: %w", err)
	}
	return sh, nil
}

// release returns sh to the pool. If the operation failed with err in a way
// that means the session is gone or stuck, the session is closed and a slot
// for a fresh one is returned instead.
func (p *pool) release(sh pkcs11.SessionHandle, err error) {
	if err != nil && sessionBroken(err) {
		_ = p.ctx.CloseSession(sh) // most likely already gone
		sh = noSession
	}
	p.free <- sh
}

// sessionBroken reports errors after which a session must not be reused.
func sessionBroken(err error) bool {
	return isRV(err, pkcs11.CKR_SESSION_HANDLE_INVALID) ||
		isRV(err, pkcs11.CKR_SESSION_CLOSED) ||
		// An operation left active (say, a C_Encrypt whose output buffer
		// could not be allocated) blocks every later *Init on the session.
		isRV(err, pkcs11.CKR_OPERATION_ACTIVE)
}

// shutdown takes every slot back (all operations must have ended) and
// closes the live sessions.
func (p *pool) shutdown() error {
	var errs []error
	for range cap(p.free) {
		sh := <-p.free
		if sh == noSession {
			continue
		}
		if err := p.ctx.CloseSession(sh); err != nil && !isRV(err, pkcs11.CKR_SESSION_HANDLE_INVALID) {
			errs = append(errs, fmt.Errorf("C_CloseSession: %w", err))
		}
	}
	return errors.Join(errs...)
}
