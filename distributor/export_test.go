package distributor

import (
	"context"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/lockedmem"
)

// SetAuditHook makes s write the records it writes itself (unseal, rekey,
// manifest install, emergency seal) through f, e.g. to fail one of them.
func SetAuditHook(s *Server, f func(context.Context, audit.Record) error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.auditHook = f
}

// KeyBuffer returns the locked buffer of s's root key (nil while sealed).
func KeyBuffer(s *Server) *lockedmem.Buffer {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.key == nil {
		return nil
	}
	return s.key.buf
}
