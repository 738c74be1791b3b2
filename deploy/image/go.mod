// Module image builds Cairn's container images without a Docker daemon. It is
// a separate module so go-containerregistry and its dependencies stay out of
// Cairn's own go.mod; it imports no Cairn package (it runs `go build` on the
// repository's commands).
module github.com/cairnkms/cairn/deploy/image

go 1.26.0

// The same patched toolchain as the main module (see its go.mod).
toolchain go1.26.11

require (
	github.com/google/go-cmp v0.7.0
	github.com/google/go-containerregistry v0.22.1
)

require (
	github.com/klauspost/compress v1.19.2 // indirect
	github.com/opencontainers/go-digest v1.0.0 // indirect
	github.com/opencontainers/image-spec v1.1.1 // indirect
)
