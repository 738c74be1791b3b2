// Command echoserver is the floor of the out-of-process data-plane benchmark
// (tests/dataplane_bench_test.go, `make bench-e2e`): a bare gRPC server over
// the same mTLS as the regional KMS (the same certificates, TLS 1.3 and
// SPIFFE peer check in the handshake) serving kms.v1.KMS with no
// interceptors, no audit, no ACL and no crypto. Each method answers with a
// message of the size Cairn's answer has, built from the request: Decrypt
// returns the bytes of the ciphertext where Cairn's plaintext would be,
// Encrypt a ciphertext-sized buffer, and so on. Whatever Cairn spends above
// this server is Cairn's own cost.
//
// It is a test tool, not part of Cairn: it lives under tests/ and is built
// only by tests/framework.
package main

import (
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/identity"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// The shape of an AES256_GCM Tink ciphertext: a 5-byte prefix (version byte
// and key ID), a 12-byte nonce, the ciphertext and a 16-byte tag.
const (
	prefixSize = 5
	nonceSize  = 12
	tagSize    = 16
	overhead   = prefixSize + nonceSize + tagSize
	keyID      = 0x2a2a2a2a
)

func main() {
	fs := flag.NewFlagSet("echoserver", flag.ExitOnError)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "echoserver: a bare mTLS gRPC server answering kms.v1.KMS with Cairn-sized messages and no work (the benchmark floor)")
		fs.PrintDefaults()
	}
	var idf identity.Flags
	idf.Register(fs)
	listen := fs.String("listen", "127.0.0.1:0", "address to serve on")
	_ = fs.Parse(os.Args[1:])
	if err := run(idf, *listen); err != nil {
		fmt.Fprintln(os.Stderr, "echoserver:", err)
		os.Exit(1)
	}
}

func run(idf identity.Flags, listen string) error {
	src, err := idf.Source(nil)
	if err != nil {
		return err
	}
	lis, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	s := grpc.NewServer(grpc.Creds(identity.ServerCredentials(src, identity.MemberOf(src.TrustDomain()))), grpc.MaxRecvMsgSize(4<<20))
	kmsv1.RegisterKMSServer(s, echo{})
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sig
		s.Stop()
	}()
	fmt.Printf("echoserver serving on %s\n", lis.Addr())
	return s.Serve(lis)
}

// echo is kms.v1.KMS without the work.
type echo struct {
	kmsv1.UnimplementedKMSServer
}

// plaintextOf is where a ciphertext's plaintext sits (an error if ct is too
// short to be one).
func plaintextOf(ct []byte) ([]byte, error) {
	if len(ct) < overhead {
		return nil, status.Errorf(codes.InvalidArgument, "echoserver: a %d-byte ciphertext is shorter than %d bytes", len(ct), overhead)
	}
	return ct[prefixSize+nonceSize : len(ct)-tagSize], nil
}

// ciphertextFor is a ciphertext-sized buffer for pt (prefix set, the rest
// the plaintext's bytes where they would be).
func ciphertextFor(pt []byte) []byte {
	ct := make([]byte, len(pt)+overhead)
	ct[0] = 1
	binary.BigEndian.PutUint32(ct[1:prefixSize], keyID)
	copy(ct[prefixSize+nonceSize:], pt)
	return ct
}

func (echo) Decrypt(_ context.Context, req *kmsv1.DecryptRequest) (*kmsv1.DecryptResponse, error) {
	pt, err := plaintextOf(req.GetCiphertext())
	if err != nil {
		return nil, err
	}
	return &kmsv1.DecryptResponse{Plaintext: pt, KeyId: keyID}, nil
}

func (echo) Encrypt(_ context.Context, req *kmsv1.EncryptRequest) (*kmsv1.EncryptResponse, error) {
	return &kmsv1.EncryptResponse{Ciphertext: ciphertextFor(req.GetPlaintext()), KeyId: keyID}, nil
}

// dataKeySize is the RAW AES256_GCM key GenerateDataKey returns.
const dataKeySize = 32

func (echo) GenerateDataKey(context.Context, *kmsv1.GenerateDataKeyRequest) (*kmsv1.GenerateDataKeyResponse, error) {
	key := make([]byte, dataKeySize)
	return &kmsv1.GenerateDataKeyResponse{PlaintextKey: key, WrappedKey: ciphertextFor(key), KeyId: keyID}, nil
}

func (echo) DecryptBatch(_ context.Context, req *kmsv1.DecryptBatchRequest) (*kmsv1.DecryptBatchResponse, error) {
	items := req.GetItems()
	out := &kmsv1.DecryptBatchResponse{Results: make([]*kmsv1.DecryptResult, len(items))}
	for i, it := range items {
		pt, err := plaintextOf(it.GetCiphertext())
		if err != nil {
			return nil, err
		}
		out.Results[i] = &kmsv1.DecryptResult{Result: &kmsv1.DecryptResult_Ok{Ok: &kmsv1.DecryptResponse{Plaintext: pt, KeyId: keyID}}}
	}
	return out, nil
}

func (echo) EncryptBatch(_ context.Context, req *kmsv1.EncryptBatchRequest) (*kmsv1.EncryptBatchResponse, error) {
	items := req.GetItems()
	out := &kmsv1.EncryptBatchResponse{Results: make([]*kmsv1.EncryptResult, len(items))}
	for i, it := range items {
		out.Results[i] = &kmsv1.EncryptResult{Result: &kmsv1.EncryptResult_Ok{Ok: &kmsv1.EncryptResponse{Ciphertext: ciphertextFor(it.GetPlaintext()), KeyId: keyID}}}
	}
	return out, nil
}
