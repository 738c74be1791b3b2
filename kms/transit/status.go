package transit

import (
	"net/http"

	"google.golang.org/grpc/codes"
)

// statusTable is the one place gRPC codes (the KMS's errors) become HTTP
// statuses, chosen as Vault answers the same condition.
var statusTable = map[codes.Code]int{
	codes.OK:              http.StatusOK,
	codes.InvalidArgument: http.StatusBadRequest,
	// A ciphertext that no longer decrypts, a version past its budget:
	// Vault reports what the client must change as 400.
	codes.FailedPrecondition: http.StatusBadRequest,
	codes.OutOfRange:         http.StatusBadRequest,
	// Vault answers an operation on a missing key with 400 ("encryption key
	// not found"); only the key read answers 404 (handled there).
	codes.NotFound:          http.StatusBadRequest,
	codes.AlreadyExists:     http.StatusBadRequest,
	codes.PermissionDenied:  http.StatusForbidden,
	codes.Unauthenticated:   http.StatusUnauthorized,
	codes.ResourceExhausted: http.StatusTooManyRequests,
	codes.Aborted:           http.StatusConflict,
	// Not ready (no bundle served), audit log unavailable: Vault's sealed
	// answer, which clients retry.
	codes.Unavailable:      http.StatusServiceUnavailable,
	codes.DeadlineExceeded: http.StatusGatewayTimeout,
	// The client went away; nobody reads the answer, the audit log has it.
	codes.Canceled:      499,
	codes.Unimplemented: http.StatusNotImplemented,
	codes.Internal:      http.StatusInternalServerError,
	codes.Unknown:       http.StatusInternalServerError,
	codes.DataLoss:      http.StatusInternalServerError,
}

// HTTPStatus returns the HTTP status of a gRPC code (500 for a code the
// table lacks).
func HTTPStatus(c codes.Code) int {
	if s, ok := statusTable[c]; ok {
		return s
	}
	return http.StatusInternalServerError
}
