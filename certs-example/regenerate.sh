#!/bin/sh
# Regenerates the EXAMPLE certificate authority and the localhost server
# certificate in this directory. These files are for tests and examples
# only: their private keys are published in the repository.
set -eu

cd "$(dirname "$0")"

days=7300 # 20 years

# The example CA: an ECDSA P-256 key (PKCS#8 PEM) and a self-signed
# certificate that may sign other certificates but not serve TLS itself.
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key
openssl req -new -x509 -key ca.key -sha256 -days "$days" \
    -subj "/O=usher example/CN=usher example CA (NOT FOR PRODUCTION)" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out ca.crt

# The server certificate for localhost, 127.0.0.1 and ::1, signed by the CA.
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out localhost.key
openssl req -new -key localhost.key -subj "/O=usher example/CN=localhost" \
    -out localhost.csr
cat > localhost.ext <<'EXT'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EXT
openssl x509 -req -in localhost.csr -CA ca.crt -CAkey ca.key \
    -CAcreateserial -sha256 -days "$days" -extfile localhost.ext \
    -out localhost.crt
rm -f localhost.csr localhost.ext ca.srl

chmod 644 ca.crt ca.key localhost.crt localhost.key
openssl verify -CAfile ca.crt localhost.crt
