package kms

import (
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/kms/keystore"
)

// Errors of the server, wrapped with the details; statusTable maps them to
// gRPC codes.
var (
	errNotReady      = errors.New("kms: not ready")
	errUnknownKeyset = errors.New("kms: no such keyset")
	errDenied        = errors.New("kms: permission denied")
	errInvalid       = errors.New("kms: invalid request")
	errWrongRegion   = errors.New("kms: bundle is for another region")
	errReplay        = errors.New("kms: no replay")
	errRegionKeys    = errors.New("kms: region keys unavailable")
	errPersist       = errors.New("kms: persisting the bundle failed")
	errAudit         = errors.New("kms: audit log unavailable")
	// errFloorUnknown is in floor.go, errStateFile in statefile.go.
)

// decryptMessage is the one message of every ciphertext that does not
// decrypt, whatever the reason: it must reveal nothing.
const decryptMessage = "kms: ciphertext does not decrypt"

// statusDecrypt is built once: decrypt failures can come in floods.
var statusDecrypt = status.Error(codes.InvalidArgument, decryptMessage)

// statusTable is the one place domain errors become gRPC codes. The first
// match wins.
var statusTable = []struct {
	err  error
	code codes.Code
}{
	{errNotReady, codes.Unavailable},
	{errUnknownKeyset, codes.NotFound},
	{errDenied, codes.PermissionDenied},
	{keystore.ErrDecrypt, codes.InvalidArgument},
	{keystore.ErrVersionGone, codes.NotFound},
	{errInvalid, codes.InvalidArgument},
	{bundle.ErrSignature, codes.InvalidArgument},
	{bundle.ErrInvalid, codes.InvalidArgument},
	{errWrongRegion, codes.InvalidArgument},
	{keystore.ErrBuild, codes.InvalidArgument},
	{errReplay, codes.FailedPrecondition},
	{bundle.ErrExpired, codes.FailedPrecondition},
	{errFloorUnknown, codes.Unavailable},
	{keystore.ErrUnsafe, codes.FailedPrecondition},
	{bundle.ErrShrink, codes.FailedPrecondition},
	{keystore.ErrBudget, codes.FailedPrecondition},
	{errRegionKeys, codes.Unavailable},
	{errAudit, codes.Unavailable},
	{keystore.ErrEncrypt, codes.Internal},
	{errPersist, codes.Internal},
	{errStateFile, codes.DataLoss},
}

// codeOf returns the gRPC code of a domain error (Internal if unknown).
func codeOf(err error) codes.Code {
	if err == nil {
		return codes.OK
	}
	if s, ok := status.FromError(err); ok {
		return s.Code()
	}
	for _, e := range statusTable {
		if errors.Is(err, e.err) {
			return e.code
		}
	}
	return codes.Internal
}

// toStatus converts a domain error to a gRPC status error. A decrypt
// failure always gets the one fixed message.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	if errors.Is(err, keystore.ErrDecrypt) {
		return statusDecrypt
	}
	return status.Error(codeOf(err), err.Error())
}

// statusMessage returns the message of a status error.
func statusMessage(err error) string { return status.Convert(err).Message() }
