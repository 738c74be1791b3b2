package distributor

import (
	"context"

	"github.com/cairnkms/cairn/internal/audit"
)

// SetAuditHook makes s write the records it writes itself (unseal, rekey,
// manifest install, emergency seal) through f, e.g. to fail one of them.
func SetAuditHook(s *Server, f func(context.Context, audit.Record) error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.auditHook = f
}
